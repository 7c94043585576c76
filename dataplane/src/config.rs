//! Building what the request path runs on from a snapshot.
//!
//! A snapshot arrives as YAML or JSON (a standalone file, or the operator's stream), is parsed
//! into the wire types of `modelgate_wire`, checked once by `modelgate_wire::check` (the same
//! rules the operator applies to each object), and built by [`compile`] into the [`Snapshot`]
//! the request path runs on. Anything wrong is reported as one [`ConfigError`] listing every
//! problem with its path; the caller keeps serving the last good snapshot.
//!
//! ```text
//!  file / stream ──parse──► SnapshotSpec ──check──► compile(StateRegistry) ──► Snapshot ──arc-swap──► proxy
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::admission::{BudgetRule, Limits};
use crate::keys::{Glob, Key, KeyHash, KeyStore};
use crate::routes::{
    Backend, Credential, OutlierPolicy, Pricing, Provider, RetryOn, RetryPolicy, Route, RouteTable,
    Strategy, Tier,
};
use crate::shadow::Shadow;
use crate::snapshot::{Snapshot, StateRegistry};

pub use modelgate_wire::check::{Problems, duration};
pub use modelgate_wire::{
    ANTHROPIC_DEFAULT_URL, BackendSpec, BudgetPeriod, BudgetSpec, ConfigError, CredentialSpec,
    KeySpec, LimitsSpec, MockSpec, OPENAI_DEFAULT_URL, OutlierSpec, PricingSpec, ProviderKind,
    RetrySpec, RouteSpec, SnapshotSpec, Source, hash_key,
};

/// The whole standalone config file: listener settings plus the snapshot itself. Read
/// strictly: an unknown field in a file is a typo, reported with its path.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
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
        let mut unknown = Vec::new();
        let file: Self = if trimmed.starts_with('{') {
            let mut de = serde_json::Deserializer::from_str(text);
            modelgate_wire::deserialize_noting_unknown(&mut de, &mut unknown)
                .and_then(|f| de.end().map(|()| f))
                .map_err(|e| ConfigError::single("", e.to_string()))?
        } else if trimmed.is_empty() {
            Self::default()
        } else {
            // The parser's default budget (250k nodes) is sized for small documents; a
            // snapshot with 100k keys has about a million. Aliases stay capped.
            let mut budget = serde_saphyr::Budget::default();
            budget.max_nodes = 20_000_000;
            budget.max_events = 40_000_000;
            budget.max_total_scalar_bytes = 1024 * 1024 * 1024;
            let mut options = serde_saphyr::Options::default();
            options.budget = Some(budget);
            serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
                modelgate_wire::deserialize_noting_unknown(de, &mut unknown)
            })
            .map_err(|e| ConfigError::single("", e.to_string()))?
        };
        modelgate_wire::refuse_unknown(unknown)?;
        Ok(file)
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
#[serde(rename_all = "camelCase", default)]
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
    /// OpenTelemetry traces (off unless `otlpEndpoint` is set).
    pub tracing: TracingSpec,
    /// The response cache's storage (routes opt in with their `cache`).
    pub cache: CacheServerSpec,
}

/// `server.cache`: where the routes' cached answers live. The proxy's own setting, never a
/// route's: a tenant cannot point the proxy at a host.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CacheServerSpec {
    /// Bytes of answers kept in this proxy's memory, all routes together (least recently
    /// used first out).
    pub memory_bytes: u64,
    /// A Redis shared by the proxies, `redis://host:port/db`, or `rediss://…` for TLS
    /// (optional).
    pub redis: Option<String>,
    /// `rediss://` only: a PEM bundle of the CAs that may sign Redis's certificate (the
    /// Mozilla roots without one).
    pub redis_ca_file: Option<String>,
    /// The ACL user to authenticate as (`default` without one; needs `redisPasswordFile`).
    pub redis_username: Option<String>,
    /// A file holding the password to `AUTH` with, read at every new connection (a mounted
    /// Secret); never the password itself.
    pub redis_password_file: Option<String>,
    /// A file holding at least 32 bytes of secret the proxies share: entries in Redis are
    /// sealed (AES-256-GCM, bound to their key) so Redis can neither read nor forge them.
    pub redis_entry_key_file: Option<String>,
    /// How long one Redis command may take, connecting included; after a failure Redis is
    /// skipped for a few seconds.
    pub redis_timeout: String,
}

impl Default for CacheServerSpec {
    fn default() -> Self {
        Self {
            memory_bytes: crate::cache::DEFAULT_MEMORY_BYTES,
            redis: None,
            redis_ca_file: None,
            redis_username: None,
            redis_password_file: None,
            redis_entry_key_file: None,
            redis_timeout: "50ms".into(),
        }
    }
}

/// `server.tracing`: a span per request after the OpenTelemetry GenAI conventions, exported
/// by OTLP/HTTP (protobuf). Off (nothing recorded, nothing allocated) without an endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TracingSpec {
    /// The collector's OTLP/HTTP base URL (`http://otel-collector:4318`); spans go to
    /// `<endpoint>/v1/traces` unless the URL already ends so.
    pub otlp_endpoint: Option<String>,
    /// Share of traces started here (no sampled parent) that are recorded, 0 to 1. A client's
    /// `traceparent` decides for its own trace.
    pub sampling_ratio: f64,
    /// Put prompts and answers on spans (`gen_ai.input.messages`, `gen_ai.output.messages`).
    pub capture_content: bool,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Ended spans waiting for export at most; more are dropped (requests never wait).
    pub max_queue_size: usize,
}

impl Default for TracingSpec {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            capture_content: false,
            service_name: "modelgate-dataplane".into(),
            max_queue_size: 4096,
        }
    }
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
            tracing: TracingSpec::default(),
            cache: CacheServerSpec::default(),
        }
    }
}

/// A streamed answer may go this long without a byte from its upstream, unless the route
/// says otherwise.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Check a snapshot and build what the request path runs on. Runtime state (rate-limit
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
    // Routes are checked first, keys one by one as they are built (one pass over 100k keys).
    let mut p = Problems::default();
    modelgate_wire::check::check_routes(&mut p, &spec.routes, source);
    // Routes with problems are not built (their keys are still checked, to report all).
    let build_routes = p.0.is_empty();
    let version = match spec.version.take() {
        Some(v) => v,
        None => spec.content_version(),
    };
    let routes_summary = summarize(&spec);
    // Then what only the proxy can find: unset env vars, unreadable credential files.
    let mut routes: Vec<Arc<Route>> = Vec::with_capacity(spec.routes.len());
    for (ri, r) in spec.routes.iter().enumerate().filter(|_| build_routes) {
        let path = format!("routes[{ri}] ({})", r.name);
        let retry = match &r.retries {
            None => RetryPolicy::default(),
            Some(rs) => {
                let backoff = duration(&rs.backoff);
                // `contextLength` is opt-in on top of the list: alone, the others are the
                // default (all).
                let on: Vec<RetryOn> = rs.retry_on.iter().filter_map(|&o| retry_on(o)).collect();
                RetryPolicy {
                    attempts: rs.attempts,
                    on: if on.is_empty() {
                        RetryOn::ALL.to_vec()
                    } else {
                        on
                    },
                    context_length: rs
                        .retry_on
                        .contains(&modelgate_wire::RetryOn::ContextLength),
                    backoff,
                    max_backoff: duration(&rs.max_backoff).max(backoff),
                }
            }
        };
        let outlier = match &r.outlier_detection {
            None => OutlierPolicy::default(),
            Some(o) => {
                let base = duration(&o.ejection_time);
                OutlierPolicy {
                    consecutive_failures: o.consecutive_failures.max(1),
                    ejection_time: base,
                    max_ejection_time: duration(&o.max_ejection_time).max(base),
                }
            }
        };
        let route_id = format!("{}/{}", r.namespace, r.name);
        let mut tiers: Vec<Tier> = Vec::new();
        for (bi, b) in r.backends.iter().enumerate() {
            let bpath = format!("{path}.backends[{bi}] ({})", b.name);
            let Some(backend) = build_backend(&mut p, &bpath, &route_id, b, registry) else {
                continue;
            };
            match tiers.iter_mut().find(|t| t.priority == b.priority) {
                Some(t) => t.backends.push(backend),
                None => tiers.push(Tier {
                    priority: b.priority,
                    backends: vec![backend],
                }),
            }
        }
        tiers.sort_by_key(|t| t.priority);
        let shadow = r.shadow.as_ref().and_then(|s| {
            let bpath = format!("{path}.shadow.backend ({})", s.backend.name);
            let backend = build_backend(&mut p, &bpath, &route_id, &s.backend, registry)?;
            Some(Shadow {
                backend,
                percent: s.percent,
                timeout: duration(
                    s.timeout
                        .as_deref()
                        .unwrap_or(modelgate_wire::DEFAULT_SHADOW_TIMEOUT),
                ),
                max_in_flight: s
                    .max_in_flight
                    .unwrap_or(modelgate_wire::DEFAULT_SHADOW_MAX_IN_FLIGHT),
                state: registry.shadow_state(&route_id),
            })
        });
        let masking = r
            .masking
            .as_ref()
            .and_then(|m| match crate::mask::Masker::new(m) {
                Ok(masker) => Some(Arc::new(masker)),
                Err(e) => {
                    p.push(&format!("{path}.masking"), e);
                    None
                }
            });
        routes.push(Arc::new(Route {
            id: route_id,
            namespace: r.namespace.clone(),
            model: r.model.clone(),
            aliases: r.aliases.clone(),
            strategy: match r.strategy {
                modelgate_wire::Strategy::LeastLatency => Strategy::LeastLatency,
                modelgate_wire::Strategy::LowestCost => Strategy::LowestCost,
                // Unknown values were refused by the check.
                _ => Strategy::Weighted,
            },
            timeout: r.timeout.as_deref().map(duration),
            retry,
            outlier,
            max_output_tokens: r.max_output_tokens,
            stream_idle_timeout: Some(
                r.stream_idle_timeout
                    .as_deref()
                    .map_or(DEFAULT_STREAM_IDLE_TIMEOUT, duration),
            ),
            stream_timeout: r.stream_timeout.as_deref().map(duration),
            max_cost_per_request: r.max_cost_per_request,
            shadow,
            cache: r
                .cache
                .as_ref()
                .map(|c| Arc::new(crate::cache::Policy::of(c))),
            masking,
            tiers,
        }));
    }

    // Keys are consumed as they are compiled, so a 100k-key snapshot is not held twice.
    let key_specs = std::mem::take(&mut spec.keys);
    let mut keys = KeyStore::with_capacity(key_specs.len());
    let mut namespaces: HashMap<String, Arc<str>, _> =
        HashMap::with_hasher(foldhash::fast::RandomState::default());
    let mut ids: HashSet<Arc<str>, _> =
        HashSet::with_capacity_and_hasher(key_specs.len(), foldhash::fast::RandomState::default());
    let mut id_buf = String::new();
    for (ki, k) in key_specs.into_iter().enumerate() {
        let Some(checked) = modelgate_wire::check::check_key(&mut p, ki, &k) else {
            continue;
        };
        let (hash, expires_at) = (KeyHash(checked.hash), checked.expires_at);
        let limits = k.limits.as_ref().map(Limits::from).unwrap_or_default();
        let budget = k.budget.as_ref().map(BudgetRule::from);
        let shared = previous
            .and_then(|s| s.keys.get(&hash))
            .filter(|old| old.same_as(&k, expires_at, &limits, budget.as_ref()));
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
                    budget: budget.map(Box::new),
                    expires_at,
                    disabled: k.disabled,
                    exhausted: k.exhausted,
                    max_cost_per_request: k.max_cost_per_request,
                    state,
                })
            }
        };
        if !ids.insert(key.id.clone()) {
            p.push(
                &modelgate_wire::check::key_path(ki, &k),
                "duplicate key name in this namespace",
            );
        }
        if !keys.insert(hash, key) {
            p.push(
                &format!("{}.sha256", modelgate_wire::check::key_path(ki, &k)),
                "another key has the same hash",
            );
        }
    }
    drop(ids);

    p.into_result()?;
    Ok(Snapshot {
        version,
        routes: RouteTable::new(routes),
        keys,
        routes_summary,
    })
}

fn retry_on(o: modelgate_wire::RetryOn) -> Option<RetryOn> {
    Some(match o {
        modelgate_wire::RetryOn::Connect => RetryOn::Connect,
        modelgate_wire::RetryOn::Timeout => RetryOn::Timeout,
        modelgate_wire::RetryOn::RateLimited => RetryOn::RateLimited,
        modelgate_wire::RetryOn::ServerError => RetryOn::ServerError,
        modelgate_wire::RetryOn::ContextLength | modelgate_wire::RetryOn::Unknown => return None,
    })
}

impl From<&LimitsSpec> for Limits {
    fn from(l: &LimitsSpec) -> Self {
        Self {
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
            max_concurrent: l.max_concurrent,
        }
    }
}

impl From<&BudgetSpec> for BudgetRule {
    fn from(b: &BudgetSpec) -> Self {
        Self {
            tokens: b.tokens,
            usd: b.usd,
            period: b.period,
        }
    }
}

/// The largest credential file read (a service-account key is a few KB).
const MAX_CREDENTIAL_FILE: u64 = 1 << 20;

/// A small file's bytes; one larger than `max` (a device such as `/dev/zero`, a wrong path)
/// is an error, never read to the end.
pub fn read_small(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(out)
}

/// A credential's text read from where the (checked) spec says: an env var, a file, or
/// inline; trimmed, never empty.
fn credential_text(p: &mut Problems, path: &str, spec: &CredentialSpec) -> Option<String> {
    let raw = if let Some(var) = &spec.env {
        match std::env::var(var) {
            Ok(v) => v,
            Err(_) => {
                p.push(path, format_args!("environment variable {var} is not set"));
                return None;
            }
        }
    } else if let Some(file) = &spec.file {
        let text = read_small(std::path::Path::new(file), MAX_CREDENTIAL_FILE).and_then(|b| {
            String::from_utf8(b)
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
        });
        match text {
            Ok(v) => v,
            Err(e) => {
                p.push(
                    path,
                    format_args!("cannot read credential file {file}: {e}"),
                );
                return None;
            }
        }
    } else {
        spec.value.clone().unwrap_or_default()
    };
    let raw = raw.trim();
    if raw.is_empty() {
        p.push(path, "the credential is empty");
        return None;
    }
    Some(raw.to_owned())
}

/// One backend (a route's or its shadow's) as the request path runs it; None, with the
/// problem noted, when its credential or provider settings cannot be used.
fn build_backend(
    p: &mut Problems,
    bpath: &str,
    route_id: &str,
    b: &BackendSpec,
    registry: &StateRegistry,
) -> Option<Arc<Backend>> {
    let cpath = format!("{bpath}.credentials");
    let text = b
        .credentials
        .as_ref()
        .and_then(|c| credential_text(p, &cpath, c));
    let credential = match &text {
        Some(t) if !b.provider.credential_is_document() => header_credential(p, &cpath, t),
        _ => None,
    };
    let ambient = registry
        .ambient_identity
        .load(std::sync::atomic::Ordering::Relaxed);
    let provider = build_provider(p, bpath, b, credential, text.as_deref(), ambient)?;
    let pricing = b
        .pricing
        .as_ref()
        .map(|pr| Pricing {
            cache_read_per_million: pr.cache_read_per_million.unwrap_or(pr.input_per_million),
            cache_write_per_million: pr.cache_write_per_million.unwrap_or(pr.input_per_million),
            ..Pricing::flat(pr.input_per_million, pr.output_per_million)
        })
        .unwrap_or_default();
    Some(Arc::new(Backend::new(
        route_id,
        &b.name,
        provider,
        b.model.clone(),
        b.weight,
        b.timeout.as_deref().map(duration),
        pricing,
        registry.backend_state(route_id, &b.name),
    )))
}

/// A credential sent in a header (an API key or a bearer token).
fn header_credential(p: &mut Problems, path: &str, raw: &str) -> Option<Credential> {
    match Credential::bearer(raw) {
        Some(c) => Some(c),
        None => {
            p.push(
                path,
                "the credential contains characters not allowed in an HTTP header",
            );
            None
        }
    }
}

/// The backend's provider. `text`: its credential's text, for the providers whose
/// credential is a document (AWS keys, a service-account key); `ambient`: whether this proxy
/// lends its own cloud identity to routes.
fn build_provider(
    p: &mut Problems,
    path: &str,
    b: &BackendSpec,
    credential: Option<Credential>,
    text: Option<&str>,
    ambient: bool,
) -> Option<Provider> {
    let built = |p: &mut Problems, r: Result<Provider, String>| match r {
        Ok(provider) => Some(provider),
        Err(e) => {
            p.push(path, e);
            None
        }
    };
    match b.provider {
        ProviderKind::Bedrock => {
            let spec = b.bedrock.clone().unwrap_or_default();
            let up =
                crate::providers::bedrock::Upstream::new(b.url.as_deref(), text, &spec, ambient);
            built(p, up.map(|u| Provider::Bedrock(Box::new(u))))
        }
        ProviderKind::Gemini => {
            let url = b
                .url
                .as_deref()
                .unwrap_or(modelgate_wire::GEMINI_DEFAULT_URL);
            let up = crate::providers::gemini::Upstream::new(url, credential);
            built(p, up.map(|u| Provider::Gemini(Box::new(u))))
        }
        ProviderKind::Vertex => {
            let spec = b.vertex.clone().unwrap_or_default();
            let up =
                crate::providers::vertex::Upstream::new(b.url.as_deref(), text, &spec, ambient);
            built(p, up.map(|u| Provider::Vertex(Box::new(u))))
        }
        ProviderKind::Mock => {
            let m = b.mock.clone().unwrap_or_default();
            Some(Provider::Mock(crate::providers::mock::MockSettings {
                latency: duration(&m.latency),
                chunk_delay: duration(&m.chunk_delay),
                output_tokens: m.output_tokens,
                dimensions: m.dimensions,
            }))
        }
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
            let url = b.url.as_deref().unwrap_or(OPENAI_DEFAULT_URL);
            match crate::providers::openai::Upstream::new(url, credential) {
                Ok(mut u) => {
                    if b.provider == ProviderKind::Openai {
                        u.max_tokens_field =
                            crate::translate::openai_chat::MaxTokensField::MaxCompletionTokens;
                        u.responses = true;
                    }
                    Some(Provider::OpenAi(Box::new(u)))
                }
                Err(e) => {
                    p.push(&format!("{path}.url"), e);
                    None
                }
            }
        }
        ProviderKind::Anthropic => {
            let url = b.url.as_deref().unwrap_or(ANTHROPIC_DEFAULT_URL);
            let spec = b.anthropic.clone().unwrap_or_default();
            match crate::providers::anthropic::Upstream::new(url, credential, &spec) {
                Ok(u) => Some(Provider::Anthropic(Box::new(u))),
                Err(e) => {
                    p.push(&format!("{path}.url"), e);
                    None
                }
            }
        }
        ProviderKind::AzureOpenai => {
            // The check made url required.
            let url = b.url.as_deref().unwrap_or_default();
            let spec = b.azure.clone().unwrap_or_default();
            match crate::providers::azure::Upstream::new(url, credential, &spec) {
                Ok(u) => Some(Provider::Azure(Box::new(u))),
                Err(e) => {
                    p.push(&format!("{path}.url"), e);
                    None
                }
            }
        }
        // Refused by the check.
        ProviderKind::Unknown => None,
    }
}

/// What `/config` shows of routes (structure and names, never a credential), as JSON text:
/// written straight from the spec, it costs a fraction of a `serde_json::Value` tree, and
/// `/config` parses it when asked. Keys are described from the running snapshot instead (a
/// snapshot may hold 100k of them). A route's cache and masking rules are shown with the
/// values in force (defaults filled in), field by field, so a field added to the wire later
/// is shown only once someone decides it may be; masking patterns are the tenant's config,
/// not secrets.
fn summarize(spec: &SnapshotSpec) -> String {
    #[derive(Serialize)]
    struct RouteView<'a> {
        name: &'a str,
        namespace: &'a str,
        model: &'a str,
        aliases: &'a [String],
        strategy: modelgate_wire::Strategy,
        #[serde(rename = "maxCostPerRequest", skip_serializing_if = "Option::is_none")]
        max_cost_per_request: Option<f64>,
        backends: Vec<BackendView<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        shadow: Option<ShadowView<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache: Option<CacheView>,
        #[serde(skip_serializing_if = "Option::is_none")]
        masking: Option<MaskingView<'a>>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct CacheView {
        ttl: String,
        /// In force: the default, or the bound capped at the largest allowed.
        max_entry_bytes: usize,
        per_key: bool,
        cache_sampled: bool,
        hit_cost_fraction: f64,
    }
    #[derive(Serialize)]
    struct MaskingView<'a> {
        rules: Vec<RuleView<'a>>,
        answers: bool,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct RuleView<'a> {
        name: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        detector: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pattern: Option<&'a str>,
        action: modelgate_wire::MaskAction,
        /// Only where it applies (`mask`).
        #[serde(skip_serializing_if = "Option::is_none")]
        keep_last: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        replacement: Option<&'a str>,
    }
    fn cache(c: &modelgate_wire::CacheSpec) -> CacheView {
        let p = crate::cache::Policy::of(c);
        CacheView {
            // As written (checked already), so it reads like the config.
            ttl: c
                .ttl
                .clone()
                .unwrap_or_else(|| modelgate_wire::DEFAULT_CACHE_TTL.into()),
            max_entry_bytes: p.max_entry_bytes,
            per_key: p.per_key,
            cache_sampled: p.cache_sampled,
            hit_cost_fraction: p.hit_cost_fraction,
        }
    }
    fn rule(r: &modelgate_wire::MaskRuleSpec) -> RuleView<'_> {
        RuleView {
            name: &r.name,
            detector: r.detector.as_deref(),
            pattern: r.pattern.as_deref(),
            action: r.action,
            keep_last: (r.action == modelgate_wire::MaskAction::Mask).then(|| {
                r.keep_last
                    .unwrap_or(modelgate_wire::DEFAULT_MASK_KEEP_LAST)
            }),
            replacement: r.replacement.as_deref(),
        }
    }
    fn masking(m: &modelgate_wire::MaskingSpec) -> MaskingView<'_> {
        MaskingView {
            rules: m.rules.iter().map(rule).collect(),
            answers: m.answers,
        }
    }
    #[derive(Serialize)]
    struct ShadowView<'a> {
        backend: BackendView<'a>,
        percent: f64,
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
    fn backend(b: &BackendSpec) -> BackendView<'_> {
        BackendView {
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
        }
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
            max_cost_per_request: r.max_cost_per_request,
            backends: r.backends.iter().map(backend).collect(),
            shadow: r.shadow.as_ref().map(|s| ShadowView {
                backend: backend(&s.backend),
                percent: s.percent,
            }),
            cache: r.cache.as_ref().map(cache),
            masking: r.masking.as_ref().map(masking),
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

    /// A credential file that never ends (or is far too large) is a config error naming the
    /// backend, read no further than its bound.
    #[test]
    fn a_credential_file_that_never_ends_is_refused() {
        let err = compile_yaml(
            "routes:\n  - {name: r, model: m, backends: [{name: b, provider: openai, credentials: {file: /dev/zero}}]}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot read credential file /dev/zero: larger than 1048576 bytes"),
            "{err}"
        );
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
    fn a_routes_cache_compiles_with_defaults_and_the_servers_storage_is_its_own() {
        let snap = compile_yaml(
            "routes:\n  - {name: r, model: m, cache: {ttl: 90s, perKey: true, hitCostFraction: 0.25}, backends: [{name: b, provider: mock}]}\n  - {name: d, model: d, cache: {}, backends: [{name: b, provider: mock}]}\n  - {name: n, model: n, backends: [{name: b, provider: mock}]}\n",
        )
        .unwrap();
        let c = snap
            .routes
            .get("default", "m")
            .unwrap()
            .cache
            .clone()
            .unwrap();
        assert_eq!(c.ttl, std::time::Duration::from_secs(90));
        assert!(c.per_key && !c.cache_sampled);
        assert_eq!(c.hit_cost_fraction, 0.25);
        assert_eq!(c.max_entry_bytes, 1 << 20);
        let d = snap
            .routes
            .get("default", "d")
            .unwrap()
            .cache
            .clone()
            .unwrap();
        assert_eq!(d.ttl, std::time::Duration::from_secs(300));
        assert!(snap.routes.get("default", "n").unwrap().cache.is_none());
        // `/config` shows both with the values in force.
        for view in [
            r#""cache":{"ttl":"90s","maxEntryBytes":1048576,"perKey":true,"cacheSampled":false,"hitCostFraction":0.25}"#,
            r#""cache":{"ttl":"5m","maxEntryBytes":1048576,"perKey":false,"cacheSampled":false,"hitCostFraction":0.0}"#,
        ] {
            assert!(
                snap.routes_summary.contains(view),
                "{}",
                snap.routes_summary
            );
        }
        assert_eq!(snap.routes_summary.matches("\"cache\"").count(), 2);
        let file = ConfigFile::parse(
            "server: {cache: {memoryBytes: 1024, redis: \"redis://127.0.0.1:6379/1\"}}\n",
        )
        .unwrap();
        assert_eq!(file.server.cache.memory_bytes, 1024);
        assert_eq!(file.server.cache.redis_timeout, "50ms");
        let typo = ConfigFile::parse("server: {cache: {memoryByte: 1}}\n").unwrap_err();
        assert!(typo.to_string().contains("memoryByte"), "{typo}");
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
    fn shadows_and_spend_guards_compile_and_a_shadows_count_outlives_a_reload() {
        let yaml = format!(
            r#"
routes:
  - name: r
    model: m
    maxCostPerRequest: 0.5
    backends:
      - {{name: b, provider: mock, pricing: {{inputPerMillion: 1, outputPerMillion: 2}}}}
    shadow:
      backend: {{name: next, provider: openai-compatible, url: "http://127.0.0.1:9/v1", model: m-2, credentials: {{env: MODELGATE_TEST_SHADOW_KEY}}}}
      percent: 25
      maxInFlight: 3
keys:
  - {{name: k, sha256: {}, maxCostPerRequest: 0.1}}
"#,
            hash_key("sk-k")
        );
        // An unset variable is named with the shadow's path, as a backend's would be.
        let err = compile_yaml(&yaml).unwrap_err().to_string();
        assert!(
            err.contains("routes[0] (r).shadow.backend (next).credentials"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("modelgate-shadow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("key");
        std::fs::write(&key_file, "sk-candidate-secret\n").unwrap();
        let yaml = yaml.replace(
            "{env: MODELGATE_TEST_SHADOW_KEY}",
            &format!("{{file: {}}}", key_file.display()),
        );
        let registry = StateRegistry::default();
        let spec = || ConfigFile::parse(&yaml).unwrap().into_snapshot();
        let snap = compile(spec(), Source::File, &registry, None).unwrap();
        let route = snap.routes.get("default", "m").unwrap();
        assert_eq!(route.max_cost_per_request, Some(0.5));
        let shadow = route.shadow.as_ref().unwrap();
        assert_eq!(
            (shadow.percent, shadow.max_in_flight, shadow.timeout),
            (25.0, 3, std::time::Duration::from_secs(60))
        );
        assert_eq!(shadow.backend.name, "next");
        assert_eq!(shadow.backend.route_id, "default/r");
        assert_eq!(shadow.backend.upstream_model.as_deref(), Some("m-2"));
        assert_eq!(route.backends().count(), 1, "the shadow takes no traffic");
        let key = snap.keys.authenticate(b"sk-k").unwrap();
        assert_eq!(key.max_cost_per_request, Some(0.1));
        // `/config` shows the shadow and the guard, never the credential.
        assert!(
            snap.routes_summary
                .contains(r#""shadow":{"backend":{"name":"next""#)
        );
        assert!(snap.routes_summary.contains(r#""maxCostPerRequest":0.5"#));
        assert!(!snap.routes_summary.contains("sk-candidate-secret"));
        assert!(!format!("{shadow:?}").contains("sk-candidate-secret"));

        let again = compile(spec(), Source::File, &registry, Some(&snap)).unwrap();
        let state = |s: &Snapshot| {
            s.routes
                .get("default", "m")
                .unwrap()
                .shadow
                .as_ref()
                .unwrap()
                .state
                .clone()
        };
        assert!(Arc::ptr_eq(&state(&snap), &state(&again)));
        // A key whose guard changed is built again.
        let changed = compile(
            ConfigFile::parse(&yaml.replace("0.1}", "0.2}"))
                .unwrap()
                .into_snapshot(),
            Source::File,
            &registry,
            Some(&again),
        )
        .unwrap();
        assert_eq!(
            changed
                .keys
                .authenticate(b"sk-k")
                .unwrap()
                .max_cost_per_request,
            Some(0.2)
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
    fn azure_backends_compile_from_yaml_and_mistakes_name_their_path() {
        let dir = std::env::temp_dir().join(format!("modelgate-azure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "azure-key-in-a-file\n").unwrap();
        let yaml = |backend: &str| {
            format!(
                "routes: [{{name: r, model: m, backends: [{{name: az, provider: azure-openai, credentials: {{file: {}}}, {backend}}}]}}]\n",
                key.display()
            )
        };
        let snap = compile_yaml(&yaml(
            "url: 'https://myres.openai.azure.com', azure: {deployment: gpt-4o, apiVersion: 2024-10-21}",
        ))
        .unwrap();
        let route = snap.routes.get("default", "m").unwrap();
        let backend = route.backends().next().unwrap();
        assert!(matches!(backend.provider, Provider::Azure(_)));
        assert_eq!(
            backend
                .provider
                .dialect(crate::translate::Dialect::OpenAiChat),
            crate::translate::Dialect::OpenAiChat
        );
        assert!(
            !format!("{:?}", backend.provider).contains("azure-key-in-a-file"),
            "never in Debug"
        );
        compile_yaml(&yaml(
            "url: 'https://myres.openai.azure.com/openai/v1', model: gpt-4o-deployment, azure: {auth: bearer}",
        ))
        .unwrap();

        let err = compile_yaml(&yaml("url: 'https://myres.openai.azure.com'"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("routes[0] (r).backends[0] (az).azure.deployment: is required unless url ends in /openai/v1"),
            "{err}"
        );
        let err = compile_yaml(&yaml(
            "url: 'https://myres.openai.azure.com', azure: {deployment: gpt-4o, apiVersion: 2024-10-21, bogus: 1}",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("bogus"), "unknown fields are refused: {err}");
        let err = compile_yaml(&yaml(
            "url: 'https://myres.openai.azure.com', azure: {deployment: gpt-4o, apiVersion: 2024-10-21, auth: msi}",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("azure.auth: must be apiKey or bearer"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
