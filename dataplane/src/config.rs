//! The snapshot wire format and its validation.
//!
//! A snapshot arrives as YAML or JSON (a standalone file today, the operator's stream later),
//! is parsed into the `*Spec` wire types below, and is validated exactly once, at this edge,
//! by [`compile`] into the [`Snapshot`] the request path runs on. Anything wrong is reported as
//! one [`ConfigError`] listing every problem with its path; the caller keeps serving the last
//! good snapshot.
//!
//! ```text
//!  file / stream ──parse──► SnapshotSpec ──compile(StateRegistry)──► Snapshot ──arc-swap──► proxy
//! ```
//!
//! No kube types live here: the operator depends on this module for the wire types only.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{Glob, Key, KeyHash, KeyStore};
use crate::routes::{
    Backend, Credential, OutlierPolicy, Pricing, Provider, RetryOn, RetryPolicy, Route, RouteTable,
    Strategy, Tier,
};
use crate::snapshot::{Snapshot, StateRegistry};

/// Where a snapshot came from; decides which credential sources are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A local file that may be committed: credentials must come from env vars or files.
    File,
    /// The operator's authenticated stream: credentials arrive inline.
    Operator,
}

/// The whole standalone config file: listener settings plus the snapshot itself.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub server: ServerSpec,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
}

impl ConfigFile {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        // JSON is a subset of YAML, but a JSON parser gives better messages for JSON input.
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') {
            serde_json::from_str(text).map_err(|e| ConfigError::single("", e.to_string()))
        } else {
            // The parser's default budget (250k nodes) is sized for small documents; a
            // snapshot with 100k keys has about a million. Aliases stay capped.
            let mut budget = serde_saphyr::Budget::default();
            budget.max_nodes = 20_000_000;
            budget.max_events = 40_000_000;
            budget.max_total_scalar_bytes = 1024 * 1024 * 1024;
            let mut options = serde_saphyr::Options::default();
            options.budget = Some(budget);
            serde_saphyr::from_str_with_options(text, options)
                .map_err(|e| ConfigError::single("", e.to_string()))
        }
    }

    pub fn into_snapshot(self) -> SnapshotSpec {
        SnapshotSpec {
            version: self.version,
            routes: self.routes,
            keys: self.keys,
        }
    }
}

/// Listener and request-path settings. Read once at start; a reload does not change them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerSpec {
    /// API listener (OpenAI-compatible endpoints).
    pub listen: String,
    /// Admin listener: /healthz, /readyz, /metrics, /config.
    pub admin: String,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: u64,
    /// Open client connections at most; further ones are closed at accept.
    pub max_connections: u32,
    /// How long a client may take to send its request headers.
    pub header_read_timeout: String,
    /// How long SIGTERM waits for in-flight requests and streams.
    pub drain_timeout: String,
    /// Output tokens reserved for a request that sets no `max_tokens`.
    pub default_max_tokens: u64,
    /// Largest server-sent event a streamed answer may carry; a larger one ends the stream
    /// with an error event (and is metered).
    pub max_stream_event_bytes: u64,
}

impl Default for ServerSpec {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin: "127.0.0.1:9090".into(),
            max_body_bytes: 8 * 1024 * 1024,
            max_connections: 10_000,
            header_read_timeout: "10s".into(),
            drain_timeout: "30s".into(),
            default_max_tokens: 1024,
            max_stream_event_bytes: crate::stream::DEFAULT_MAX_EVENT_BYTES as u64,
        }
    }
}

/// A streamed answer may go this long without a byte from its upstream, unless the route
/// says otherwise.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Where provider `openai` goes when a backend names no url.
pub const OPENAI_DEFAULT_URL: &str = "https://api.openai.com/v1";

/// The snapshot as it travels: the routes and keys of the namespaces a proxy serves.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// Set by the operator (a content hash); computed here when absent.
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The public model name clients send.
    pub model: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Deadline for the whole request until response headers, across retries.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<RetrySpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for; larger ones get
    /// a 400 naming this ceiling. Requests that set neither reserve at most this much.
    /// Left out when unset, so proxies that predate it accept snapshots that do not use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// A streamed answer whose upstream sends nothing for this long ends with an error event
    /// (metered). Left out when unset (default 5m), like `maxOutputTokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<String>,
    /// The longest a streamed answer may last from its response headers (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_timeout: Option<String>,
    pub backends: Vec<BackendSpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts after the first one, per priority tier.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Which failures are retried; all of them when empty. (Not `on`: YAML 1.1 tools read
    /// a bare `on` key as `true`.)
    #[serde(default)]
    pub retry_on: Vec<RetryOn>,
    /// First backoff; doubles per attempt, with jitter.
    #[serde(default = "default_backoff")]
    pub backoff: String,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierSpec {
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_ejection_time")]
    pub ejection_time: String,
    #[serde(default = "default_max_ejection_time")]
    pub max_ejection_time: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    Openai,
    OpenaiCompatible,
    Anthropic,
    AzureOpenai,
    Mock,
}

impl ProviderKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::OpenaiCompatible => "openai-compatible",
            Self::Anthropic => "anthropic",
            Self::AzureOpenai => "azure-openai",
            Self::Mock => "mock",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    pub name: String,
    pub provider: ProviderKind,
    /// Base URL including the API version path, e.g. `http://127.0.0.1:8000/v1`.
    #[serde(default)]
    pub url: Option<String>,
    /// Upstream model name (pins a version); the client's model name when absent.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Fallback tier: lower first.
    #[serde(default)]
    pub priority: u32,
    #[serde(default)]
    pub credentials: Option<CredentialSpec>,
    /// Deadline for one attempt until response headers (and the body when not streaming).
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub pricing: Option<PricingSpec>,
    /// Settings of the built-in mock provider.
    #[serde(default)]
    pub mock: Option<MockSpec>,
}

/// One of `env`, `file` or (operator stream only) `value`.
#[derive(Clone, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialSpec {
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

impl fmt::Debug for CredentialSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialSpec")
            .field("env", &self.env)
            .field("file", &self.file)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PricingSpec {
    /// USD per million input (prompt) tokens.
    #[serde(default)]
    pub input_per_million: f64,
    /// USD per million output (completion) tokens.
    #[serde(default)]
    pub output_per_million: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MockSpec {
    /// Wait before the response headers.
    pub latency: String,
    /// Completion tokens per answer (one streamed chunk each).
    pub output_tokens: u32,
    /// Wait between streamed chunks.
    pub chunk_delay: String,
    /// Embedding vector length.
    pub dimensions: u32,
}

impl Default for MockSpec {
    fn default() -> Self {
        Self {
            latency: "0ms".into(),
            output_tokens: 16,
            chunk_delay: "0ms".into(),
            dimensions: 8,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Hex SHA-256 of the raw key (`modelgate-dataplane hash-key` prints it).
    pub sha256: String,
    /// Allowed model names or globs (`gpt-*`); every route of the namespace when empty.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
    /// RFC 3339 time after which the key is refused.
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    /// Set by the operator when usage across all proxies used up the budget.
    #[serde(default)]
    pub exhausted: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSpec {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub usd: Option<f64>,
    #[serde(default)]
    pub period: BudgetPeriod,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    #[default]
    Month,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_weight() -> u32 {
    1
}
fn default_attempts() -> u32 {
    2
}
fn default_backoff() -> String {
    "100ms".into()
}
fn default_max_backoff() -> String {
    "2s".into()
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_ejection_time() -> String {
    "30s".into()
}
fn default_max_ejection_time() -> String {
    "300s".into()
}

/// Every problem found in a snapshot, each with the path of the field at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    pub fn single(path: &str, msg: impl Into<String>) -> Self {
        let msg = msg.into();
        Self {
            problems: vec![if path.is_empty() {
                msg
            } else {
                format!("{path}: {msg}")
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, path: &str, msg: impl fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }

    fn duration(&mut self, path: &str, text: &str) -> Duration {
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.push(
                    path,
                    format_args!("invalid duration {text:?} ({e}); use e.g. 30s or 500ms"),
                );
                Duration::ZERO
            }
        }
    }

    fn opt_duration(&mut self, path: &str, text: &Option<String>) -> Option<Duration> {
        let text = text.as_deref()?;
        // An unreadable duration is reported once (as unreadable), not also as zero.
        let d = self.duration(path, text);
        if d.is_zero() && humantime::parse_duration(text).is_ok() {
            self.push(path, "must be greater than zero");
        }
        Some(d)
    }
}

/// Hex SHA-256 of a raw key, as the snapshot carries it.
pub fn hash_key(raw: &str) -> String {
    let digest = Sha256::digest(raw.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn parse_hash(text: &str) -> Option<KeyHash> {
    let text = text.strip_prefix("sha256:").unwrap_or(text);
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(KeyHash(out))
}

fn content_version(spec: &SnapshotSpec) -> String {
    // Hashed as it is written: a 100k-key snapshot would otherwise be copied once more.
    struct HashWriter(Sha256);
    impl std::io::Write for HashWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, HashWriter(Sha256::new()));
    let _ = serde_json::to_writer(&mut w, spec);
    let _ = std::io::Write::flush(&mut w);
    let digest = w.into_parts().0.0.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Validate a snapshot and build what the request path runs on. Runtime state (rate-limit
/// windows, backend health) is carried over from `registry` for objects that keep their name.
///
/// Keys that `previous` (the snapshot being replaced) already holds unchanged are shared
/// with it rather than built again: most swaps change a few objects of many.
pub fn compile(
    mut spec: SnapshotSpec,
    source: Source,
    registry: &StateRegistry,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, ConfigError> {
    let version = match spec.version.take() {
        Some(v) => v,
        None => content_version(&spec),
    };
    let routes_summary = summarize(&spec);
    let mut p = Problems(Vec::new());
    let mut routes: Vec<Arc<Route>> = Vec::new();
    let mut names: HashSet<(String, String)> = HashSet::new();
    let mut models: HashMap<(String, String), String> = HashMap::new();

    for (ri, r) in spec.routes.iter().enumerate() {
        let path = format!("routes[{ri}] ({})", r.name);
        if !valid_name(&r.name) {
            p.push(
                &path,
                "name must be non-empty and use only letters, digits, '-', '.', '_'",
            );
        }
        if !valid_name(&r.namespace) {
            p.push(&path, "namespace is not a valid name");
        }
        if !names.insert((r.namespace.clone(), r.name.clone())) {
            p.push(&path, "duplicate route name in this namespace");
        }
        for m in std::iter::once(&r.model).chain(r.aliases.iter()) {
            if m.is_empty() {
                p.push(&path, "model and aliases must be non-empty");
                continue;
            }
            if let Some(other) = models.insert((r.namespace.clone(), m.clone()), r.name.clone())
                && other != r.name
            {
                p.push(
                    &path,
                    format_args!(
                        "model {m:?} is already served by route {other:?} in namespace {:?}",
                        r.namespace
                    ),
                );
            }
        }
        let timeout = p.opt_duration(&format!("{path}.timeout"), &r.timeout);
        let stream_idle_timeout = p
            .opt_duration(&format!("{path}.streamIdleTimeout"), &r.stream_idle_timeout)
            .or(Some(DEFAULT_STREAM_IDLE_TIMEOUT));
        let stream_timeout = p.opt_duration(&format!("{path}.streamTimeout"), &r.stream_timeout);
        if let Some(n) = r.max_output_tokens
            && !(1..=crate::request::MAX_OUTPUT_TOKENS).contains(&n)
        {
            p.push(
                &format!("{path}.maxOutputTokens"),
                format_args!("must be from 1 to {}", crate::request::MAX_OUTPUT_TOKENS),
            );
        }
        let retry = match &r.retries {
            None => RetryPolicy::default(),
            Some(rs) => {
                let backoff = p.duration(&format!("{path}.retries.backoff"), &rs.backoff);
                let max_backoff =
                    p.duration(&format!("{path}.retries.maxBackoff"), &rs.max_backoff);
                if rs.attempts > 10 {
                    p.push(&format!("{path}.retries.attempts"), "at most 10");
                }
                RetryPolicy {
                    attempts: rs.attempts,
                    on: if rs.retry_on.is_empty() {
                        RetryOn::ALL.to_vec()
                    } else {
                        rs.retry_on.clone()
                    },
                    backoff,
                    max_backoff: max_backoff.max(backoff),
                }
            }
        };
        let outlier = match &r.outlier_detection {
            None => OutlierPolicy::default(),
            Some(o) => {
                let base = p.duration(
                    &format!("{path}.outlierDetection.ejectionTime"),
                    &o.ejection_time,
                );
                let max = p.duration(
                    &format!("{path}.outlierDetection.maxEjectionTime"),
                    &o.max_ejection_time,
                );
                if o.consecutive_failures == 0 {
                    p.push(
                        &format!("{path}.outlierDetection.consecutiveFailures"),
                        "must be at least 1",
                    );
                }
                OutlierPolicy {
                    consecutive_failures: o.consecutive_failures.max(1),
                    ejection_time: base,
                    max_ejection_time: max.max(base),
                }
            }
        };
        if r.backends.is_empty() {
            p.push(&path, "needs at least one backend");
        }
        let route_id = format!("{}/{}", r.namespace, r.name);
        let mut backend_names = HashSet::new();
        let mut tiers: Vec<Tier> = Vec::new();
        for (bi, b) in r.backends.iter().enumerate() {
            let bpath = format!("{path}.backends[{bi}] ({})", b.name);
            if !valid_name(&b.name) {
                p.push(
                    &bpath,
                    "name must be non-empty and use only letters, digits, '-', '.', '_'",
                );
            }
            if !backend_names.insert(b.name.clone()) {
                p.push(&bpath, "duplicate backend name in this route");
            }
            if b.weight == 0
                && r.backends
                    .iter()
                    .filter(|o| o.priority == b.priority)
                    .all(|o| o.weight == 0)
            {
                p.push(
                    &bpath,
                    "every backend of this priority tier has weight 0; give one a positive weight",
                );
            }
            if b.weight > 1_000_000 {
                p.push(&bpath, "weight must be at most 1000000");
            }
            let timeout = p.opt_duration(&format!("{bpath}.timeout"), &b.timeout);
            let credential = resolve_credential(&mut p, &bpath, b.credentials.as_ref(), source);
            let provider = build_provider(&mut p, &bpath, b, credential);
            let pricing = b
                .pricing
                .as_ref()
                .map(|pr| {
                    let price_ok = |x: f64| x.is_finite() && x >= 0.0;
                    if !price_ok(pr.input_per_million) || !price_ok(pr.output_per_million) {
                        p.push(
                            &format!("{bpath}.pricing"),
                            "prices must be finite and not negative",
                        );
                    }
                    Pricing {
                        input_per_million: pr.input_per_million,
                        output_per_million: pr.output_per_million,
                    }
                })
                .unwrap_or_default();
            let Some(provider) = provider else { continue };
            let backend = Arc::new(Backend::new(
                &route_id,
                &b.name,
                provider,
                b.model.clone(),
                b.weight,
                timeout,
                pricing,
                registry.backend_state(&route_id, &b.name),
            ));
            match tiers.iter_mut().find(|t| t.priority == b.priority) {
                Some(t) => t.backends.push(backend),
                None => tiers.push(Tier {
                    priority: b.priority,
                    backends: vec![backend],
                }),
            }
        }
        tiers.sort_by_key(|t| t.priority);
        routes.push(Arc::new(Route {
            id: route_id,
            namespace: r.namespace.clone(),
            model: r.model.clone(),
            aliases: r.aliases.clone(),
            strategy: r.strategy,
            timeout,
            retry,
            outlier,
            max_output_tokens: r.max_output_tokens,
            stream_idle_timeout,
            stream_timeout,
            tiers,
        }));
    }

    // Keys are consumed as they are compiled, so a 100k-key snapshot is not held twice.
    let key_specs = std::mem::take(&mut spec.keys);
    let mut keys = KeyStore::with_capacity(key_specs.len());
    let fast = foldhash::fast::RandomState::default();
    let mut ids: HashSet<Arc<str>, _> =
        HashSet::with_capacity_and_hasher(key_specs.len(), fast.clone());
    let mut namespaces: HashMap<String, Arc<str>, _> = HashMap::with_hasher(fast);
    let mut id_buf = String::new();
    for (ki, k) in key_specs.into_iter().enumerate() {
        let path = || format!("keys[{ki}] ({})", k.name);
        if !valid_name(&k.name) || !valid_name(&k.namespace) {
            p.push(
                &path(),
                "name and namespace must be non-empty and use only letters, digits, '-', '.', '_'",
            );
        }
        let Some(hash) = parse_hash(&k.sha256) else {
            p.push(
                &format!("{}.sha256", path()),
                "must be 64 hex digits (the SHA-256 of the raw key)",
            );
            continue;
        };
        let expires_at = match &k.expires_at {
            None => None,
            Some(t) => match humantime::parse_rfc3339_weak(t) {
                Ok(at) => Some(at),
                Err(e) => {
                    p.push(
                        &format!("{}.expiresAt", path()),
                        format_args!("invalid RFC 3339 time {t:?} ({e})"),
                    );
                    None
                }
            },
        };
        let limits = k.limits.clone().unwrap_or_default();
        for (field, v) in [
            ("requestsPerMinute", limits.requests_per_minute),
            ("tokensPerMinute", limits.tokens_per_minute),
            ("maxConcurrent", limits.max_concurrent.map(u64::from)),
        ] {
            if v == Some(0) {
                p.push(
                    &format!("{}.limits.{field}", path()),
                    "must be at least 1 (omit it for no limit)",
                );
            }
        }
        if let Some(b) = &k.budget {
            if b.tokens.is_none() && b.usd.is_none() {
                p.push(&format!("{}.budget", path()), "set tokens or usd");
            }
            if let Some(usd) = b.usd
                && !(usd.is_finite() && usd > 0.0)
            {
                p.push(
                    &format!("{}.budget.usd", path()),
                    "must be a positive number",
                );
            }
        }
        let shared = previous
            .and_then(|s| s.keys.get(&hash))
            .filter(|old| old.same_as(&k, expires_at, &limits));
        let key = match shared {
            Some(old) => old.clone(),
            None => {
                id_buf.clear();
                id_buf.push_str(&k.namespace);
                id_buf.push('/');
                id_buf.push_str(&k.name);
                let id: Arc<str> = id_buf.as_str().into();
                let state = OnceLock::new();
                if let Some(s) = registry.existing_key_state(&id) {
                    let _ = state.set(s);
                }
                let namespace = match namespaces.get(&k.namespace) {
                    Some(ns) => ns.clone(),
                    None => {
                        let ns: Arc<str> = k.namespace.as_str().into();
                        namespaces.insert(k.namespace.clone(), ns.clone());
                        ns
                    }
                };
                Arc::new(Key {
                    id,
                    namespace,
                    models: k.models.iter().map(|m| Glob::new(m)).collect(),
                    limits,
                    budget: k.budget.clone().map(Box::new),
                    expires_at,
                    disabled: k.disabled,
                    exhausted: k.exhausted,
                    state,
                })
            }
        };
        if !ids.insert(key.id.clone()) {
            p.push(&path(), "duplicate key name in this namespace");
        }
        if !keys.insert(hash, key) {
            p.push(
                &format!("{}.sha256", path()),
                "another key has the same hash",
            );
        }
    }
    drop(ids);

    if !p.0.is_empty() {
        return Err(ConfigError { problems: p.0 });
    }
    Ok(Snapshot {
        version,
        routes: RouteTable::new(routes),
        keys,
        routes_summary,
    })
}

fn resolve_credential(
    p: &mut Problems,
    path: &str,
    spec: Option<&CredentialSpec>,
    source: Source,
) -> Option<Credential> {
    let spec = spec?;
    let path = format!("{path}.credentials");
    let set = [
        spec.env.is_some(),
        spec.file.is_some(),
        spec.value.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if set != 1 {
        p.push(&path, "set exactly one of env, file or value");
        return None;
    }
    let raw = if let Some(var) = &spec.env {
        match std::env::var(var) {
            Ok(v) => v,
            Err(_) => {
                p.push(&path, format_args!("environment variable {var} is not set"));
                return None;
            }
        }
    } else if let Some(file) = &spec.file {
        match std::fs::read_to_string(file) {
            Ok(v) => v,
            Err(e) => {
                p.push(
                    &path,
                    format_args!("cannot read credential file {file}: {e}"),
                );
                return None;
            }
        }
    } else {
        if source == Source::File {
            p.push(
                &path,
                "inline credential values are not allowed in a config file; use env or file so the file can be committed safely",
            );
            return None;
        }
        spec.value.clone().unwrap_or_default()
    };
    let raw = raw.trim();
    if raw.is_empty() {
        p.push(&path, "the credential is empty");
        return None;
    }
    match Credential::bearer(raw) {
        Some(c) => Some(c),
        None => {
            p.push(
                &path,
                "the credential contains characters not allowed in an HTTP header",
            );
            None
        }
    }
}

fn build_provider(
    p: &mut Problems,
    path: &str,
    b: &BackendSpec,
    credential: Option<Credential>,
) -> Option<Provider> {
    match b.provider {
        ProviderKind::Mock => {
            let m = b.mock.clone().unwrap_or_default();
            let latency = p.duration(&format!("{path}.mock.latency"), &m.latency);
            let chunk_delay = p.duration(&format!("{path}.mock.chunkDelay"), &m.chunk_delay);
            if m.output_tokens == 0 || m.output_tokens > 100_000 {
                p.push(
                    &format!("{path}.mock.outputTokens"),
                    "must be between 1 and 100000",
                );
            }
            if m.dimensions == 0 || m.dimensions > 16_384 {
                p.push(
                    &format!("{path}.mock.dimensions"),
                    "must be between 1 and 16384",
                );
            }
            Some(Provider::Mock(crate::providers::mock::MockSettings {
                latency,
                chunk_delay,
                output_tokens: m.output_tokens,
                dimensions: m.dimensions,
            }))
        }
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
            if b.mock.is_some() {
                p.push(path, "mock settings apply only to provider mock");
            }
            let url = match (&b.url, &b.provider) {
                (Some(u), _) => u.clone(),
                (None, ProviderKind::Openai) => OPENAI_DEFAULT_URL.into(),
                (None, _) => {
                    p.push(path, "url is required for provider openai-compatible");
                    return None;
                }
            };
            if b.provider == ProviderKind::Openai && credential.is_none() {
                p.push(
                    path,
                    "provider openai needs credentials (env or file with the API key)",
                );
            }
            match crate::providers::openai::Upstream::new(&url, credential) {
                Ok(u) => Some(Provider::OpenAi(Box::new(u))),
                Err(e) => {
                    p.push(&format!("{path}.url"), e);
                    None
                }
            }
        }
        ProviderKind::Anthropic | ProviderKind::AzureOpenai => {
            p.push(
                path,
                format_args!(
                    "provider {} is not supported by this proxy version yet",
                    b.provider.as_str()
                ),
            );
            None
        }
    }
}

/// What `/config` shows of routes (structure and names, never a credential), as JSON text:
/// written straight from the spec, it costs a fraction of a `serde_json::Value` tree, and
/// `/config` parses it when asked. Keys are described from the running snapshot instead (a
/// snapshot may hold 100k of them).
fn summarize(spec: &SnapshotSpec) -> String {
    #[derive(Serialize)]
    struct RouteView<'a> {
        name: &'a str,
        namespace: &'a str,
        model: &'a str,
        aliases: &'a [String],
        strategy: Strategy,
        backends: Vec<BackendView<'a>>,
    }
    #[derive(Serialize)]
    struct BackendView<'a> {
        name: &'a str,
        provider: &'static str,
        url: Option<&'a str>,
        model: Option<&'a str>,
        weight: u32,
        priority: u32,
        credentials: Option<CredentialView<'a>>,
    }
    #[derive(Serialize)]
    #[serde(untagged)]
    enum CredentialView<'a> {
        Env { env: &'a str },
        File { file: &'a str },
        Inline(&'static str),
    }
    let routes: Vec<RouteView<'_>> = spec
        .routes
        .iter()
        .map(|r| RouteView {
            name: &r.name,
            namespace: &r.namespace,
            model: &r.model,
            aliases: &r.aliases,
            strategy: r.strategy,
            backends: r
                .backends
                .iter()
                .map(|b| BackendView {
                    name: &b.name,
                    provider: b.provider.as_str(),
                    url: b.url.as_deref(),
                    model: b.model.as_deref(),
                    weight: b.weight,
                    priority: b.priority,
                    credentials: b.credentials.as_ref().map(|c| match (&c.env, &c.file) {
                        (Some(env), _) => CredentialView::Env { env },
                        (_, Some(file)) => CredentialView::File { file },
                        _ => CredentialView::Inline("<redacted>"),
                    }),
                })
                .collect(),
        })
        .collect();
    serde_json::to_string(&routes).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_yaml(y: &str) -> Result<Snapshot, ConfigError> {
        let f = ConfigFile::parse(y)?;
        compile(
            f.into_snapshot(),
            Source::File,
            &StateRegistry::default(),
            None,
        )
    }

    #[test]
    fn hashes_keys_like_sha256sum() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let err = compile_yaml(
            r#"
routes:
  - name: r1
    model: m
    timeout: soon
    backends:
      - {name: a, provider: openai-compatible}
      - {name: a, provider: mock, weight: 0}
keys:
  - {name: k, sha256: nothex}
"#,
        )
        .expect_err("invalid");
        let all = err.to_string();
        assert!(
            all.contains("routes[0] (r1).timeout: invalid duration"),
            "{all}"
        );
        assert_eq!(
            all.matches("routes[0] (r1).timeout").count(),
            1,
            "reported once: {all}"
        );
        assert!(all.contains("url is required"), "{all}");
        assert!(all.contains("duplicate backend name"), "{all}");
        assert!(all.contains("keys[0] (k).sha256"), "{all}");
    }

    #[test]
    fn max_output_tokens_is_a_positive_route_ceiling() {
        let yaml = |n: &str| {
            format!(
                "routes: [{{name: r, model: m, maxOutputTokens: {n}, backends: [{{name: b, provider: mock}}]}}]\n"
            )
        };
        let snap = compile_yaml(&yaml("4096")).unwrap();
        let route = snap.routes.get("default", "m").unwrap();
        assert_eq!(route.max_output_tokens, Some(4096));
        for bad in ["0", "4294967296"] {
            let err = compile_yaml(&yaml(bad)).unwrap_err().to_string();
            assert!(
                err.contains("routes[0] (r).maxOutputTokens: must be from 1"),
                "{err}"
            );
        }
        assert!(compile_yaml(&yaml("-1")).is_err());
        // Unset, it is left out of the wire form (older proxies reject unknown fields).
        let spec = ConfigFile::parse(&yaml("null")).unwrap().into_snapshot();
        assert!(
            !serde_json::to_string(&spec)
                .unwrap()
                .contains("maxOutputTokens")
        );
    }

    #[test]
    fn unchanged_keys_are_shared_with_the_previous_snapshot_and_keep_their_counters() {
        let h = |raw: &str| hash_key(raw);
        let yaml = |limit: u64| {
            format!(
                "routes: [{{name: r, model: m, backends: [{{name: b, provider: mock}}]}}]\nkeys:\n  - {{name: a, sha256: {}}}\n  - {{name: b, sha256: {}, limits: {{requestsPerMinute: {limit}}}}}\n",
                h("sk-a"),
                h("sk-b")
            )
        };
        let registry = StateRegistry::default();
        let spec = |y: &str| ConfigFile::parse(y).unwrap().into_snapshot();
        let first = compile(spec(&yaml(10)), Source::File, &registry, None).unwrap();
        let a1 = first.keys.authenticate(b"sk-a").unwrap().clone();
        let b1 = first.keys.authenticate(b"sk-b").unwrap().clone();
        assert!(a1.state.get().is_none(), "no counters before the first use");
        let used = crate::admission::admit(
            &b1,
            &registry,
            crate::admission::Estimate {
                tokens: 1,
                usd: 0.0,
            },
            crate::admission::unix_now(),
        )
        .unwrap();
        used.settle(1, 0.0);

        let second = compile(spec(&yaml(20)), Source::File, &registry, Some(&first)).unwrap();
        let a2 = second.keys.authenticate(b"sk-a").unwrap();
        let b2 = second.keys.authenticate(b"sk-b").unwrap();
        assert!(Arc::ptr_eq(&a1, a2), "an unchanged key is shared");
        assert!(!Arc::ptr_eq(&b1, b2), "a changed key is built again");
        assert_eq!(b2.limits.requests_per_minute, Some(20));
        assert!(
            Arc::ptr_eq(b1.state.get().unwrap(), b2.state.get().unwrap()),
            "the rebuilt key keeps the counters of the old one"
        );

        // A second key of the same name is still refused when the first one is shared.
        let dup = format!("{}  - {{name: a, sha256: {}}}\n", yaml(20), h("sk-a2"));
        let err = compile(spec(&dup), Source::File, &registry, Some(&second)).unwrap_err();
        assert!(err.to_string().contains("duplicate key name"), "{err}");
    }

    #[test]
    fn rejects_inline_credentials_in_files_and_unknown_fields() {
        let err = compile_yaml(
            "routes: [{name: r, model: m, backends: [{name: b, provider: openai, credentials: {value: sk-x}}]}]",
        )
        .expect_err("inline value refused");
        assert!(
            err.to_string()
                .contains("inline credential values are not allowed")
        );
        assert!(!err.to_string().contains("sk-x"));
        let err = ConfigFile::parse("routes: [{name: r, model: m, bogus: 1, backends: []}]")
            .expect_err("unknown field");
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn duplicate_models_in_a_namespace_are_refused_but_not_across() {
        let two = |ns2: &str| {
            format!(
                "routes:\n - {{name: a, model: m, backends: [{{name: b, provider: mock}}]}}\n - {{name: c, namespace: {ns2}, model: m, backends: [{{name: b, provider: mock}}]}}\n"
            )
        };
        assert!(compile_yaml(&two("default")).is_err());
        let s = compile_yaml(&two("other")).expect("valid");
        assert!(s.routes.get("default", "m").is_some());
        assert!(s.routes.get("other", "m").is_some());
    }

    #[test]
    fn version_is_a_content_hash() {
        let y = "routes: [{name: a, model: m, backends: [{name: b, provider: mock}]}]";
        let a = compile_yaml(y).unwrap();
        let b = compile_yaml(y).unwrap();
        let c = compile_yaml(&y.replace("model: m", "model: n")).unwrap();
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
    }
}
