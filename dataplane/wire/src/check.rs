//! The rules every snapshot satisfies, checked by the operator (object by object, so one bad
//! object gets a condition and cannot take the snapshot down) and again by the proxy before
//! it builds anything (so a bad snapshot is refused whole and the last good one serves).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use crate::spec::{
    BackendSpec, CredentialSpec, KeySpec, ProviderKind, RetryOn, RouteSpec, SnapshotSpec, Strategy,
};

/// The largest `max_tokens` a request or a route ceiling may name.
pub const MAX_OUTPUT_TOKENS: u64 = u32::MAX as u64;

/// Where a snapshot came from; decides which credential sources are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A local file that may be committed: credentials must come from env vars or files.
    File,
    /// The operator's authenticated stream: credentials arrive inline.
    Operator,
}

/// Every problem found in a snapshot, each with the path of the field at fault.
#[derive(Debug, Clone)]
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

impl std::error::Error for ConfigError {}

/// A duration as the snapshot writes it (`30s`, `500ms`); zero when unreadable, which
/// [`check`] has already refused.
pub fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_default()
}

/// Names of routes, backends, keys and namespaces.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Problems found so far, each with its path.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    pub fn push(&mut self, path: &str, msg: impl fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }

    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: self.0 })
        }
    }

    fn duration(&mut self, path: &str, text: &str) {
        if let Err(e) = humantime::parse_duration(text) {
            self.push(
                path,
                format_args!("invalid duration {text:?} ({e}); use e.g. 30s or 500ms"),
            );
        }
    }

    fn positive_duration(&mut self, path: &str, text: &Option<String>) {
        let Some(text) = text.as_deref() else { return };
        // An unreadable duration is reported once (as unreadable), not also as zero.
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => self.push(path, "must be greater than zero"),
            Ok(_) => {}
            Err(_) => self.duration(path, text),
        }
    }
}

/// Check a whole snapshot. Reading credentials from env vars or files is the proxy's part.
pub fn check(spec: &SnapshotSpec, source: Source) -> Result<(), ConfigError> {
    let mut p = Problems::default();
    check_routes(&mut p, &spec.routes, source);
    let mut ids: HashSet<(&str, &str)> = HashSet::with_capacity(spec.keys.len());
    let mut hashes: HashSet<[u8; 32]> = HashSet::with_capacity(spec.keys.len());
    for (ki, k) in spec.keys.iter().enumerate() {
        let Some(checked) = check_key(&mut p, ki, k) else {
            continue;
        };
        if !ids.insert((&k.namespace, &k.name)) {
            p.push(&key_path(ki, k), "duplicate key name in this namespace");
        }
        if !hashes.insert(checked.hash) {
            p.push(
                &format!("{}.sha256", key_path(ki, k)),
                "another key has the same hash",
            );
        }
    }
    p.into_result()
}

/// Check the routes of a snapshot (names, models unique per namespace, every field).
pub fn check_routes(p: &mut Problems, routes: &[RouteSpec], source: Source) {
    let mut names: HashSet<(&str, &str)> = HashSet::new();
    let mut models: HashMap<(&str, &str), &str> = HashMap::new();
    for (ri, r) in routes.iter().enumerate() {
        let path = format!("routes[{ri}] ({})", r.name);
        if !names.insert((&r.namespace, &r.name)) {
            p.push(&path, "duplicate route name in this namespace");
        }
        for m in std::iter::once(&r.model).chain(r.aliases.iter()) {
            if m.is_empty() {
                continue;
            }
            if let Some(other) = models.insert((&r.namespace, m), &r.name)
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
        check_route(p, &path, r, source);
    }
}

/// The path of key `index` in problems.
pub fn key_path(index: usize, k: &KeySpec) -> String {
    format!("keys[{index}] ({})", k.name)
}

fn check_route(p: &mut Problems, path: &str, r: &RouteSpec, source: Source) {
    if !valid_name(&r.name) {
        p.push(
            path,
            "name must be non-empty and use only letters, digits, '-', '.', '_'",
        );
    }
    if !valid_name(&r.namespace) {
        p.push(path, "namespace is not a valid name");
    }
    if std::iter::once(&r.model)
        .chain(r.aliases.iter())
        .any(|m| m.is_empty())
    {
        p.push(path, "model and aliases must be non-empty");
    }
    if r.strategy == Strategy::Unknown {
        p.push(
            &format!("{path}.strategy"),
            "this strategy is not known to this proxy version; upgrade the proxies",
        );
    }
    p.positive_duration(&format!("{path}.timeout"), &r.timeout);
    p.positive_duration(&format!("{path}.streamIdleTimeout"), &r.stream_idle_timeout);
    p.positive_duration(&format!("{path}.streamTimeout"), &r.stream_timeout);
    if let Some(n) = r.max_output_tokens
        && !(1..=MAX_OUTPUT_TOKENS).contains(&n)
    {
        p.push(
            &format!("{path}.maxOutputTokens"),
            format_args!("must be from 1 to {MAX_OUTPUT_TOKENS}"),
        );
    }
    if let Some(rs) = &r.retries {
        p.duration(&format!("{path}.retries.backoff"), &rs.backoff);
        p.duration(&format!("{path}.retries.maxBackoff"), &rs.max_backoff);
        if rs.attempts > 10 {
            p.push(&format!("{path}.retries.attempts"), "at most 10");
        }
        if rs.retry_on.contains(&RetryOn::Unknown) {
            p.push(
                &format!("{path}.retries.retryOn"),
                "a condition is not known to this proxy version; upgrade the proxies",
            );
        }
    }
    if let Some(o) = &r.outlier_detection {
        p.duration(
            &format!("{path}.outlierDetection.ejectionTime"),
            &o.ejection_time,
        );
        p.duration(
            &format!("{path}.outlierDetection.maxEjectionTime"),
            &o.max_ejection_time,
        );
        if o.consecutive_failures == 0 {
            p.push(
                &format!("{path}.outlierDetection.consecutiveFailures"),
                "must be at least 1",
            );
        }
    }
    if r.backends.is_empty() {
        p.push(path, "needs at least one backend");
    }
    let mut backend_names = HashSet::new();
    for (bi, b) in r.backends.iter().enumerate() {
        let bpath = format!("{path}.backends[{bi}] ({})", b.name);
        if !valid_name(&b.name) {
            p.push(
                &bpath,
                "name must be non-empty and use only letters, digits, '-', '.', '_'",
            );
        }
        if !backend_names.insert(&b.name) {
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
        check_backend(p, &bpath, b, source);
    }
    if let Some(usd) = r.max_cost_per_request {
        let mpath = format!("{path}.maxCostPerRequest");
        if !(usd.is_finite() && usd > 0.0) {
            p.push(&mpath, "must be a positive number of US dollars");
        } else if !r.backends.iter().any(priced) {
            p.push(
                &mpath,
                "no backend of this route has pricing, so every request costs $0 and the guard could never refuse one; give the backends pricing",
            );
        }
    }
    if let Some(s) = &r.shadow {
        check_shadow(p, path, r, s, source);
    }
    if let Some(c) = &r.cache {
        check_cache(p, &format!("{path}.cache"), c);
    }
    if let Some(m) = &r.masking {
        check_masking(p, &format!("{path}.masking"), m);
    }
}

fn check_cache(p: &mut Problems, cpath: &str, c: &crate::CacheSpec) {
    p.positive_duration(&format!("{cpath}.ttl"), &c.ttl);
    if let Some(n) = c.max_entry_bytes
        && !(1..=crate::MAX_CACHE_ENTRY_BYTES).contains(&n)
    {
        p.push(
            &format!("{cpath}.maxEntryBytes"),
            format_args!("must be from 1 to {}", crate::MAX_CACHE_ENTRY_BYTES),
        );
    }
    let f = c.hit_cost_fraction;
    if !(f.is_finite() && (0.0..=1.0).contains(&f)) {
        p.push(
            &format!("{cpath}.hitCostFraction"),
            "must be a number from 0 to 1",
        );
    }
}

/// A custom masking pattern compiled the way the proxy runs it: bounded in size, and never
/// matching empty text (a rule that could would "find" something between every character).
pub fn compile_mask_pattern(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.len() > crate::MAX_MASK_PATTERN {
        return Err(format!("is longer than {} bytes", crate::MAX_MASK_PATTERN));
    }
    let hir = regex_syntax::Parser::new().parse(pattern).map_err(|e| {
        format!(
            "is not a valid regular expression: {}",
            one_line(&e.to_string())
        )
    })?;
    if hir.properties().minimum_len().is_none_or(|n| n == 0) {
        return Err("can match empty text; make it match at least one character".into());
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(crate::MASK_PATTERN_SIZE_LIMIT)
        .dfa_size_limit(crate::MASK_PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("does not compile: {}", one_line(&e.to_string())))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn check_masking(p: &mut Problems, mpath: &str, m: &crate::MaskingSpec) {
    use crate::MaskAction;
    if m.rules.is_empty() {
        p.push(&format!("{mpath}.rules"), "needs at least one rule");
    }
    if m.rules.len() > crate::MAX_MASK_RULES {
        p.push(
            &format!("{mpath}.rules"),
            format_args!("at most {} rules", crate::MAX_MASK_RULES),
        );
    }
    let mut names = HashSet::new();
    for (i, rule) in m.rules.iter().enumerate() {
        let rpath = format!("{mpath}.rules[{i}] ({})", rule.name);
        if !valid_name(&rule.name) {
            p.push(
                &rpath,
                "name must be non-empty and use only letters, digits, '-', '.', '_'",
            );
        }
        if !names.insert(&rule.name) {
            p.push(&rpath, "duplicate rule name in this route");
        }
        match (&rule.detector, &rule.pattern) {
            (Some(_), Some(_)) | (None, None) => {
                p.push(&rpath, "needs exactly one of detector and pattern");
            }
            (Some(d), None) => {
                if !crate::MASK_DETECTORS.contains(&d.as_str()) {
                    p.push(
                        &format!("{rpath}.detector"),
                        format_args!(
                            "unknown detector {:?}; one of {}",
                            d.chars().take(64).collect::<String>(),
                            crate::MASK_DETECTORS.join(", ")
                        ),
                    );
                }
            }
            (None, Some(pat)) => {
                if let Err(e) = compile_mask_pattern(pat) {
                    p.push(&format!("{rpath}.pattern"), e);
                }
            }
        }
        match rule.action {
            MaskAction::Unknown => p.push(
                &format!("{rpath}.action"),
                "an action not known to this proxy version; one of redact, mask, block",
            ),
            MaskAction::Mask => {}
            MaskAction::Redact | MaskAction::Block => {
                if rule.keep_last.is_some() {
                    p.push(
                        &format!("{rpath}.keepLast"),
                        "applies to the mask action only",
                    );
                }
            }
        }
        if let Some(n) = rule.keep_last
            && n > crate::MAX_MASK_KEEP_LAST
        {
            p.push(
                &format!("{rpath}.keepLast"),
                format_args!("must be from 0 to {}", crate::MAX_MASK_KEEP_LAST),
            );
        }
        if let Some(r) = &rule.replacement {
            if rule.action != MaskAction::Redact {
                p.push(
                    &format!("{rpath}.replacement"),
                    "applies to the redact action only",
                );
            }
            if r.len() > crate::MAX_MASK_REPLACEMENT {
                p.push(
                    &format!("{rpath}.replacement"),
                    format_args!("at most {} bytes", crate::MAX_MASK_REPLACEMENT),
                );
            }
        }
    }
}

/// Whether a backend has any price above zero.
fn priced(b: &BackendSpec) -> bool {
    b.pricing.as_ref().is_some_and(|pr| {
        [pr.input_per_million, pr.output_per_million]
            .into_iter()
            .chain(pr.cache_read_per_million)
            .chain(pr.cache_write_per_million)
            .any(|x| x > 0.0)
    })
}

/// What every backend, a route's or a shadow, must satisfy on its own.
fn check_backend(p: &mut Problems, bpath: &str, b: &BackendSpec, source: Source) {
    p.positive_duration(&format!("{bpath}.timeout"), &b.timeout);
    if let Some(c) = &b.credentials {
        check_credential(p, &format!("{bpath}.credentials"), c, source, &b.provider);
    }
    if let Some(pr) = &b.pricing {
        let price_ok = |x: f64| x.is_finite() && x >= 0.0;
        let cache = [pr.cache_read_per_million, pr.cache_write_per_million];
        if !price_ok(pr.input_per_million)
            || !price_ok(pr.output_per_million)
            || !cache.into_iter().flatten().all(price_ok)
        {
            p.push(
                &format!("{bpath}.pricing"),
                "prices must be finite and not negative",
            );
        }
    }
    check_provider(p, bpath, b);
}

fn check_shadow(
    p: &mut Problems,
    path: &str,
    r: &RouteSpec,
    s: &crate::ShadowSpec,
    source: Source,
) {
    let spath = format!("{path}.shadow");
    if !(s.percent.is_finite() && (0.0..=100.0).contains(&s.percent)) {
        p.push(&format!("{spath}.percent"), "must be from 0 to 100");
    }
    p.positive_duration(&format!("{spath}.timeout"), &s.timeout);
    if let Some(n) = s.max_in_flight
        && !(1..=crate::MAX_SHADOW_IN_FLIGHT).contains(&n)
    {
        p.push(
            &format!("{spath}.maxInFlight"),
            format_args!("must be from 1 to {}", crate::MAX_SHADOW_IN_FLIGHT),
        );
    }
    let b = &s.backend;
    let bpath = format!("{spath}.backend ({})", b.name);
    if !valid_name(&b.name) {
        p.push(
            &bpath,
            "name must be non-empty and use only letters, digits, '-', '.', '_'",
        );
    }
    if r.backends.iter().any(|o| o.name == b.name) {
        p.push(
            &bpath,
            "the shadow backend needs a name of its own: a backend of this route has it, and metrics tell the two apart by name",
        );
    }
    if b.weight != 1 || b.priority != 0 {
        p.push(
            &bpath,
            "weight and priority do not apply to a shadow backend (percent says how much traffic it sees)",
        );
    }
    check_backend(p, &bpath, b, source);
}

fn check_credential(
    p: &mut Problems,
    path: &str,
    c: &CredentialSpec,
    source: Source,
    provider: &ProviderKind,
) {
    let document = provider.credential_is_document();
    let set = [c.env.is_some(), c.file.is_some(), c.value.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if set != 1 {
        p.push(path, "set exactly one of env, file or value");
        return;
    }
    if let Some(v) = &c.value {
        if source == Source::File {
            p.push(
                path,
                "inline credential values are not allowed in a config file; use env or file so the file can be committed safely",
            );
            return;
        }
        let v = v.trim();
        if v.is_empty() {
            p.push(path, "the credential is empty");
        } else if document {
            // A JSON document (AWS keys, a Google service-account key): the proxy reads its
            // fields and says what is missing; here only that it is JSON at all.
            if let Err(e) = crate::credentials::check_document(provider, v) {
                p.push(path, e);
            }
        } else if !credential_chars_ok(v) {
            p.push(
                path,
                "the credential contains characters not allowed in an HTTP header",
            );
        }
    }
}

/// Whether a (trimmed) credential can travel in an HTTP header value.
pub fn credential_chars_ok(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn check_provider(p: &mut Problems, path: &str, b: &BackendSpec) {
    if !b.provider.supported() {
        let what = if b.provider == ProviderKind::Unknown {
            "this provider is not known to this proxy version; upgrade the proxies".to_owned()
        } else {
            format!(
                "provider {} is not supported by this proxy version yet",
                b.provider.as_str()
            )
        };
        p.push(path, what);
        return;
    }
    if b.provider == ProviderKind::Mock {
        let m = b.mock.clone().unwrap_or_default();
        p.duration(&format!("{path}.mock.latency"), &m.latency);
        p.duration(&format!("{path}.mock.chunkDelay"), &m.chunk_delay);
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
        return;
    }
    if b.mock.is_some() {
        p.push(path, "mock settings apply only to provider mock");
    }
    let derived_url = match b.provider {
        ProviderKind::Bedrock => b.bedrock.is_some(),
        ProviderKind::Vertex => b.vertex.is_some(),
        _ => false,
    };
    match (&b.url, b.provider.default_url()) {
        (Some(u), _) => {
            if let Err(e) = check_url(u) {
                p.push(&format!("{path}.url"), e);
            }
        }
        (None, Some(_)) => {}
        // Checked with the settings it comes from.
        (None, None) if derived_url => {}
        (None, None) => p.push(
            path,
            format!("url is required for provider {}", b.provider.as_str()),
        ),
    }
    let ambient = match &b.provider {
        ProviderKind::Bedrock => b.bedrock.as_ref().is_some_and(|s| {
            matches!(
                s.auth,
                crate::BedrockAuth::WebIdentity | crate::BedrockAuth::PodIdentity
            )
        }),
        ProviderKind::Vertex => b
            .vertex
            .as_ref()
            .is_some_and(|s| s.auth == crate::VertexAuth::WorkloadIdentity),
        _ => false,
    };
    if ambient && b.credentials.is_some() {
        p.push(
            &format!("{path}.credentials"),
            "must be absent: this backend signs with the proxy's own cloud identity",
        );
    }
    if matches!(
        b.provider,
        ProviderKind::Openai
            | ProviderKind::Anthropic
            | ProviderKind::AzureOpenai
            | ProviderKind::Bedrock
            | ProviderKind::Gemini
            | ProviderKind::Vertex
    ) && b.credentials.is_none()
        && !ambient
    {
        let what = match b.provider {
            ProviderKind::AzureOpenai => "the API key, or an Entra ID token with auth: bearer",
            ProviderKind::Bedrock => {
                "AWS keys as JSON {\"AccessKeyId\", \"SecretAccessKey\", \"SessionToken\"?}, or auth: webIdentity"
            }
            ProviderKind::Vertex => "a service-account key (JSON), or auth: workloadIdentity",
            _ => "the API key",
        };
        p.push(
            path,
            format!(
                "provider {} needs credentials ({what})",
                b.provider.as_str()
            ),
        );
    }
    match (&b.anthropic, &b.provider) {
        (None, _) => {}
        (Some(a), ProviderKind::Anthropic) => check_anthropic(p, &format!("{path}.anthropic"), a),
        (Some(_), _) => p.push(path, "anthropic settings apply only to provider anthropic"),
    }
    match (&b.bedrock, &b.provider) {
        (Some(s), ProviderKind::Bedrock) => check_bedrock(p, &format!("{path}.bedrock"), s),
        (None, ProviderKind::Bedrock) => p.push(
            path,
            "provider bedrock needs bedrock settings (at least region)",
        ),
        (None, _) => {}
        (Some(_), _) => p.push(path, "bedrock settings apply only to provider bedrock"),
    }
    match (&b.vertex, &b.provider) {
        (Some(s), ProviderKind::Vertex) => check_vertex(p, &format!("{path}.vertex"), s),
        (None, ProviderKind::Vertex) => p.push(
            path,
            "provider vertex needs vertex settings (at least project and location)",
        ),
        (None, _) => {}
        (Some(_), _) => p.push(path, "vertex settings apply only to provider vertex"),
    }
    match (&b.azure, &b.provider) {
        (a, ProviderKind::AzureOpenai) => {
            let default = crate::AzureSpec::default();
            let a = a.as_ref().unwrap_or(&default);
            check_azure(p, path, b.url.as_deref().unwrap_or_default(), a);
        }
        (None, _) => {}
        (Some(_), _) => p.push(path, "azure settings apply only to provider azure-openai"),
    }
}

/// A region or location name: lowercase letters, digits and `-`, safe in a host name.
fn region_token(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_bedrock(p: &mut Problems, path: &str, s: &crate::BedrockSpec) {
    if !region_token(&s.region) {
        p.push(
            &format!("{path}.region"),
            "must be an AWS region such as us-east-1",
        );
    }
    use crate::BedrockAuth::{PodIdentity, WebIdentity};
    for (field, set, only_with) in [
        ("roleArn", s.role_arn.is_some(), WebIdentity),
        (
            "webIdentityTokenFile",
            s.web_identity_token_file.is_some(),
            WebIdentity,
        ),
        ("stsUrl", s.sts_url.is_some(), WebIdentity),
        ("credentialsUri", s.credentials_uri.is_some(), PodIdentity),
        (
            "authorizationTokenFile",
            s.authorization_token_file.is_some(),
            PodIdentity,
        ),
    ] {
        if set && s.auth != only_with {
            let auth = if only_with == WebIdentity {
                "webIdentity"
            } else {
                "podIdentity"
            };
            p.push(
                &format!("{path}.{field}"),
                format!("applies only with auth: {auth}"),
            );
        }
    }
    match s.auth {
        crate::BedrockAuth::Credentials => {}
        crate::BedrockAuth::WebIdentity => {
            match &s.role_arn {
                Some(arn) if arn.starts_with("arn:") && arn.len() <= 2048 => {}
                _ => p.push(
                    &format!("{path}.roleArn"),
                    "is required with auth: webIdentity, e.g. arn:aws:iam::123456789012:role/modelgate",
                ),
            }
            if let Some(u) = &s.sts_url
                && let Err(e) = check_url(u)
            {
                p.push(&format!("{path}.stsUrl"), e);
            }
        }
        crate::BedrockAuth::PodIdentity => {
            if let Some(u) = &s.credentials_uri
                && let Err(e) = check_url(u)
            {
                p.push(&format!("{path}.credentialsUri"), e);
            }
        }
        crate::BedrockAuth::Unknown => p.push(
            &format!("{path}.auth"),
            "must be credentials, webIdentity or podIdentity (this proxy version knows no other)",
        ),
    }
}

fn check_vertex(p: &mut Problems, path: &str, s: &crate::VertexSpec) {
    // Project ids: 6 to 30 lowercase letters, digits and hyphens.
    if !region_token(&s.project) {
        p.push(
            &format!("{path}.project"),
            "must be a Google Cloud project id (lowercase letters, digits, '-')",
        );
    }
    if !region_token(&s.location) {
        p.push(
            &format!("{path}.location"),
            "must be a location such as us-central1 or global",
        );
    }
    if s.publisher == crate::VertexPublisher::Unknown {
        p.push(
            &format!("{path}.publisher"),
            "must be google or anthropic (this proxy version knows no other)",
        );
    }
    match s.auth {
        crate::VertexAuth::ServiceAccountKey => {
            if s.metadata_url.is_some() {
                p.push(
                    &format!("{path}.metadataUrl"),
                    "applies only with auth: workloadIdentity",
                );
            }
        }
        crate::VertexAuth::WorkloadIdentity => {
            if let Some(u) = &s.metadata_url
                && let Err(e) = check_url(u)
            {
                p.push(&format!("{path}.metadataUrl"), e);
            }
        }
        crate::VertexAuth::Unknown => p.push(
            &format!("{path}.auth"),
            "must be serviceAccountKey or workloadIdentity (this proxy version knows no other)",
        ),
    }
}

/// Letters, digits, `-`, `_`, `.`: safe in a URL path segment and a query value unescaped.
fn url_token(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn check_azure(p: &mut Problems, path: &str, url: &str, a: &crate::AzureSpec) {
    let apath = format!("{path}.azure");
    if a.auth == crate::AzureAuth::Unknown {
        p.push(
            &format!("{apath}.auth"),
            "must be apiKey or bearer (this proxy version knows no other)",
        );
    }
    if let Some(d) = &a.deployment
        && !url_token(d)
    {
        p.push(
            &format!("{apath}.deployment"),
            "must be a deployment name of 1 to 128 letters, digits, '-', '_', '.'",
        );
    }
    if let Some(v) = &a.api_version
        && !url_token(v)
    {
        p.push(
            &format!("{apath}.apiVersion"),
            "must be a version such as 2024-10-21 (letters, digits, '-', '_', '.')",
        );
    }
    if url.is_empty() {
        // Already reported: url is required.
        return;
    }
    if crate::AzureSpec::is_v1_url(url) {
        for (field, set) in [
            ("deployment", a.deployment.is_some()),
            ("apiVersion", a.api_version.is_some()),
        ] {
            if set {
                p.push(
                    &format!("{apath}.{field}"),
                    "must be absent when url ends in /openai/v1 (the v1 API names the deployment in the body's model: set the backend's model)",
                );
            }
        }
        return;
    }
    let base = url.trim_end_matches('/');
    if base.ends_with("/openai") || base.contains("/openai/deployments") {
        p.push(
            &format!("{path}.url"),
            "must be the resource endpoint, e.g. https://myres.openai.azure.com (the gateway adds /openai/deployments/...), or end in /openai/v1 for the v1 API",
        );
    }
    match (&a.deployment, &a.api_version) {
        (None, _) => p.push(
            &format!("{apath}.deployment"),
            "is required unless url ends in /openai/v1 (the v1 API)",
        ),
        (Some(_), None) => p.push(
            &format!("{apath}.apiVersion"),
            "is required with azure.deployment, e.g. 2024-10-21",
        ),
        (Some(_), Some(_)) => {}
    }
}

fn check_anthropic(p: &mut Problems, path: &str, a: &crate::AnthropicSpec) {
    // Both travel as header values: printable ASCII, and no comma inside one flag.
    let token = |v: &str| {
        !v.is_empty()
            && v.len() <= 128
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if let Some(v) = &a.version
        && !token(v)
    {
        p.push(
            &format!("{path}.version"),
            "must be a version such as 2023-06-01 (letters, digits, '-', '_', '.')",
        );
    }
    for (i, flag) in a.beta.iter().enumerate() {
        if !token(flag) {
            p.push(
                &format!("{path}.beta[{i}]"),
                "must be one flag such as prompt-caching-2024-07-31 (letters, digits, '-', '_', '.')",
            );
        }
    }
    if a.beta.len() > 32 {
        p.push(&format!("{path}.beta"), "at most 32 flags");
    }
    if a.default_max_tokens
        .is_some_and(|n| n == 0 || n > u64::from(u32::MAX))
    {
        p.push(
            &format!("{path}.defaultMaxTokens"),
            "must be between 1 and 4294967295",
        );
    }
}

/// A backend base URL: http(s), a host, no query string.
pub fn check_url(url: &str) -> Result<http::Uri, String> {
    let base = url.trim_end_matches('/');
    let parsed: http::Uri = base
        .parse()
        .map_err(|e| format!("invalid URL {base:?}: {e}"))?;
    match parsed.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("URL {base:?} must start with http:// or https://")),
    }
    if parsed.authority().is_none() {
        return Err(format!("URL {base:?} has no host"));
    }
    if parsed.query().is_some() {
        return Err(format!("URL {base:?} must not have a query string"));
    }
    Ok(parsed)
}

/// What checking a key read, so the proxy does not read it twice.
pub struct CheckedKey {
    pub hash: [u8; 32],
    pub expires_at: Option<std::time::SystemTime>,
}

/// Check one key on its own (duplicates are the caller's part: a proxy finds them as it
/// builds its key table, in the same pass). None when its hash is unreadable.
pub fn check_key(p: &mut Problems, index: usize, k: &KeySpec) -> Option<CheckedKey> {
    let path = || key_path(index, k);
    if !valid_name(&k.name) || !valid_name(&k.namespace) {
        p.push(
            &path(),
            "name and namespace must be non-empty and use only letters, digits, '-', '.', '_'",
        );
    }
    let Some(hash) = crate::parse_key_hash(&k.sha256) else {
        p.push(
            &format!("{}.sha256", path()),
            "must be 64 hex digits (the SHA-256 of the raw key)",
        );
        return None;
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
    if let Some(l) = &k.limits {
        for (field, v) in [
            ("requestsPerMinute", l.requests_per_minute),
            ("tokensPerMinute", l.tokens_per_minute),
            ("maxConcurrent", l.max_concurrent.map(u64::from)),
        ] {
            if v == Some(0) {
                p.push(
                    &format!("{}.limits.{field}", path()),
                    "must be at least 1 (omit it for no limit)",
                );
            }
        }
    }
    if let Some(usd) = k.max_cost_per_request
        && !(usd.is_finite() && usd > 0.0)
    {
        p.push(
            &format!("{}.maxCostPerRequest", path()),
            "must be a positive number of US dollars",
        );
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
    Some(CheckedKey { hash, expires_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azure(url: Option<&str>, settings: Option<crate::AzureSpec>, creds: bool) -> SnapshotSpec {
        let json = serde_json::json!({"routes": [{"name": "r", "model": "m", "backends": [{
            "name": "az", "provider": "azure-openai", "url": url,
            "credentials": if creds { serde_json::json!({"value": "k"}) } else { serde_json::Value::Null },
            "azure": settings,
        }]}]});
        serde_json::from_value(json).unwrap()
    }

    fn spec(d: Option<&str>, v: Option<&str>) -> Option<crate::AzureSpec> {
        Some(crate::AzureSpec {
            deployment: d.map(str::to_owned),
            api_version: v.map(str::to_owned),
            auth: crate::AzureAuth::ApiKey,
        })
    }

    fn problems(s: &SnapshotSpec) -> String {
        match check(s, Source::Operator) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    const AT: &str = "routes[0] (r).backends[0] (az)";

    fn route(extra: serde_json::Value) -> SnapshotSpec {
        let mut r = serde_json::json!({"name": "r", "model": "m", "backends": [
            {"name": "a", "provider": "mock", "pricing": {"inputPerMillion": 1.0, "outputPerMillion": 2.0}}]});
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(serde_json::json!({"routes": [r]})).unwrap()
    }

    #[test]
    fn masking_rules_are_checked_each_with_its_path() {
        let masking = |m: serde_json::Value| problems(&route(serde_json::json!({"masking": m})));
        let ok = route(serde_json::json!({"masking": {"answers": true, "rules": [
            {"name": "cards", "detector": "credit-card", "action": "block"},
            {"name": "mail", "detector": "email"},
            {"name": "tail", "detector": "phone", "action": "mask", "keepLast": 2},
            {"name": "ticket", "pattern": "TICKET-[0-9]{4}", "replacement": "[T]"}]}}));
        assert_eq!(problems(&ok), "");
        let m = ok.routes[0].masking.as_ref().unwrap();
        assert!(m.answers);
        assert_eq!(m.rules[1].action, crate::MaskAction::Redact, "the default");
        let at = "routes[0] (r).masking.rules";
        for (rules, want) in [
            (
                serde_json::json!([{"name": "x", "detector": "passport"}]),
                format!("{at}[0] (x).detector: unknown detector \"passport\""),
            ),
            (
                serde_json::json!([{"name": "x", "pattern": "(unclosed"}]),
                format!("{at}[0] (x).pattern: is not a valid regular expression"),
            ),
            (
                serde_json::json!([{"name": "x", "pattern": "a*"}]),
                format!("{at}[0] (x).pattern: can match empty text"),
            ),
            (
                serde_json::json!([{"name": "x", "pattern": "\\w{1000}\\w{1000}\\w{1000}"}]),
                format!("{at}[0] (x).pattern: does not compile"),
            ),
            (
                serde_json::json!([{"name": "x", "detector": "email"}, {"name": "x", "detector": "ssn"}]),
                format!("{at}[1] (x): duplicate rule name in this route"),
            ),
            (
                serde_json::json!([{"name": "x", "detector": "email", "action": "mask", "keepLast": 17}]),
                format!("{at}[0] (x).keepLast: must be from 0 to 16"),
            ),
            (
                serde_json::json!([{"name": "x", "detector": "email", "keepLast": 2}]),
                format!("{at}[0] (x).keepLast: applies to the mask action only"),
            ),
            (
                serde_json::json!([{"name": "x", "detector": "email", "pattern": "a"}]),
                format!("{at}[0] (x): needs exactly one of detector and pattern"),
            ),
            (
                serde_json::json!([{"name": "x", "detector": "email", "action": "shred"}]),
                format!("{at}[0] (x).action: an action not known"),
            ),
            (
                serde_json::json!([]),
                format!("{at}: needs at least one rule"),
            ),
        ] {
            let got = masking(serde_json::json!({"rules": rules}));
            assert!(got.contains(&want), "{got}\n  wanted: {want}");
        }
    }

    #[test]
    fn spend_guards_are_positive_dollars_on_priced_routes() {
        assert_eq!(
            problems(&route(serde_json::json!({"maxCostPerRequest": 0.05}))),
            ""
        );
        for bad in [0.0, -1.0] {
            let got = problems(&route(serde_json::json!({"maxCostPerRequest": bad})));
            assert!(
                got.contains("routes[0] (r).maxCostPerRequest: must be a positive number"),
                "{got}"
            );
        }
        let mut unpriced = route(serde_json::json!({"maxCostPerRequest": 0.05}));
        unpriced.routes[0].backends[0].pricing = None;
        let got = problems(&unpriced);
        assert!(
            got.contains("maxCostPerRequest: no backend of this route has pricing"),
            "{got}"
        );
        let key = |usd: f64| -> SnapshotSpec {
            serde_json::from_value(serde_json::json!({"keys": [{"name": "k",
                "sha256": crate::hash_key("sk-a"), "maxCostPerRequest": usd}]}))
            .unwrap()
        };
        assert_eq!(problems(&key(0.5)), "");
        let got = problems(&key(-0.5));
        assert!(
            got.contains("keys[0] (k).maxCostPerRequest: must be a positive number"),
            "{got}"
        );
    }

    #[test]
    fn a_shadow_is_checked_like_a_backend_and_named_with_its_path() {
        let shadow = |s: serde_json::Value| route(serde_json::json!({"shadow": s}));
        let ok = shadow(
            serde_json::json!({"backend": {"name": "next", "provider": "mock"},
            "percent": 12.5, "timeout": "5s", "maxInFlight": 8}),
        );
        assert_eq!(problems(&ok), "");
        assert_eq!(ok.routes[0].shadow.as_ref().unwrap().percent, 12.5);
        let defaults = shadow(serde_json::json!({"backend": {"name": "next", "provider": "mock"}}));
        assert_eq!(defaults.routes[0].shadow.as_ref().unwrap().percent, 100.0);

        let at = "routes[0] (r).shadow";
        let cases = [
            (
                serde_json::json!({"backend": {"name": "next", "provider": "mock"}, "percent": 101}),
                format!("{at}.percent: must be from 0 to 100"),
            ),
            (
                serde_json::json!({"backend": {"name": "next", "provider": "mock"}, "timeout": "0s"}),
                format!("{at}.timeout: must be greater than zero"),
            ),
            (
                serde_json::json!({"backend": {"name": "next", "provider": "mock"}, "maxInFlight": 0}),
                format!("{at}.maxInFlight: must be from 1 to 10000"),
            ),
            (
                serde_json::json!({"backend": {"name": "a", "provider": "mock"}}),
                format!("{at}.backend (a): the shadow backend needs a name of its own"),
            ),
            (
                serde_json::json!({"backend": {"name": "next", "provider": "mock", "weight": 5}}),
                format!("{at}.backend (next): weight and priority do not apply"),
            ),
            (
                serde_json::json!({"backend": {"name": "next", "provider": "openai"}}),
                format!("{at}.backend (next): provider openai needs credentials"),
            ),
            (
                serde_json::json!({"backend": {"name": "next", "provider": "openai-compatible",
                    "url": "ftp://h/v1"}}),
                format!("{at}.backend (next).url: URL"),
            ),
            (
                serde_json::json!({"backend": {"name": "next", "provider": "mock",
                    "pricing": {"inputPerMillion": -1, "outputPerMillion": 1}}}),
                format!("{at}.backend (next).pricing: prices must be finite"),
            ),
        ];
        for (s, want) in cases {
            let got = problems(&shadow(s));
            assert!(got.contains(&want), "want {want:?} in {got:?}");
        }
        // A file may not carry an inline credential for a shadow either.
        let inline = shadow(
            serde_json::json!({"backend": {"name": "next", "provider": "openai",
            "credentials": {"value": "sk-x"}}}),
        );
        let got = check(&inline, Source::File).unwrap_err().to_string();
        assert!(
            got.contains(&format!(
                "{at}.backend (next).credentials: inline credential values are not allowed"
            )),
            "{got}"
        );
        assert!(!got.contains("sk-x"));
    }

    #[test]
    fn a_cache_is_checked_with_its_path() {
        let cache = |c: serde_json::Value| route(serde_json::json!({"cache": c}));
        let ok = cache(
            serde_json::json!({"ttl": "10m", "maxEntryBytes": 4096, "perKey": true,
            "cacheSampled": true, "hitCostFraction": 0.5}),
        );
        assert_eq!(problems(&ok), "");
        let c = ok.routes[0].cache.as_ref().unwrap();
        assert!(c.per_key && c.cache_sampled && c.hit_cost_fraction == 0.5);
        let defaults = cache(serde_json::json!({}));
        assert_eq!(problems(&defaults), "");
        assert_eq!(
            defaults.routes[0].cache.as_ref().unwrap(),
            &crate::CacheSpec::default()
        );
        let at = "routes[0] (r).cache";
        for (c, want) in [
            (
                serde_json::json!({"ttl": "0s"}),
                format!("{at}.ttl: must be greater than zero"),
            ),
            (serde_json::json!({"ttl": "soon"}), format!("{at}.ttl: ")),
            (
                serde_json::json!({"maxEntryBytes": 0}),
                format!("{at}.maxEntryBytes: must be from 1 to 67108864"),
            ),
            (
                serde_json::json!({"hitCostFraction": 1.5}),
                format!("{at}.hitCostFraction: must be a number from 0 to 1"),
            ),
            (
                serde_json::json!({"hitCostFraction": -0.1}),
                format!("{at}.hitCostFraction: must be a number from 0 to 1"),
            ),
        ] {
            let got = problems(&cache(c));
            assert!(got.contains(&want), "want {want:?} in {got:?}");
        }
        // A route without a cache serializes without one (older proxies read it as before).
        let json = serde_json::to_string(&route(serde_json::json!({}))).unwrap();
        assert!(!json.contains("\"cache\""), "{json}");
    }

    #[test]
    fn snapshots_without_the_new_fields_serialize_as_before() {
        let plain = route(serde_json::json!({}));
        let json = serde_json::to_string(&plain).unwrap();
        assert!(
            !json.contains("maxCostPerRequest") && !json.contains("shadow"),
            "{json}"
        );
        let key: SnapshotSpec = serde_json::from_value(serde_json::json!({"keys": [{"name": "k",
            "sha256": crate::hash_key("sk-a")}]}))
        .unwrap();
        assert!(
            !serde_json::to_string(&key)
                .unwrap()
                .contains("maxCostPerRequest")
        );
    }

    #[test]
    fn anthropic_settings_are_checked_and_named_with_their_path() {
        let backend = |extra: serde_json::Value| -> SnapshotSpec {
            let mut b = serde_json::json!({"name": "an", "provider": "anthropic", "credentials": {"value": "k"}});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value(
                serde_json::json!({"routes": [{"name": "r", "model": "m", "backends": [b]}]}),
            )
            .unwrap()
        };
        let at = "routes[0] (r).backends[0] (an)";
        assert_eq!(
            problems(&backend(serde_json::json!({}))),
            "",
            "the default URL"
        );
        assert_eq!(
            problems(&backend(
                serde_json::json!({"anthropic": {"version": "2023-06-01",
                "beta": ["prompt-caching-2024-07-31"], "defaultMaxTokens": 4096}})
            )),
            ""
        );
        let bad = problems(&backend(
            serde_json::json!({"anthropic": {"version": "2023 06 01",
            "beta": ["a,b"], "defaultMaxTokens": 0}}),
        ));
        for want in [
            format!("{at}.anthropic.version: must be a version"),
            format!("{at}.anthropic.beta[0]: must be one flag"),
            format!("{at}.anthropic.defaultMaxTokens: must be between 1 and 4294967295"),
        ] {
            assert!(bad.contains(&want), "{want} in {bad}");
        }
        let mut no_key = backend(serde_json::json!({}));
        no_key.routes[0].backends[0].credentials = None;
        assert!(problems(&no_key).contains("provider anthropic needs credentials"));
        let other: SnapshotSpec =
            serde_json::from_value(serde_json::json!({"routes": [{"name": "r",
            "model": "m", "backends": [{"name": "an", "provider": "openai-compatible",
            "url": "http://127.0.0.1:1/v1", "anthropic": {}}]}]}))
            .unwrap();
        assert!(problems(&other).contains("anthropic settings apply only to provider anthropic"));
    }

    #[test]
    fn bedrock_auth_fields_apply_only_with_their_auth() {
        let bedrock = |settings: serde_json::Value| -> SnapshotSpec {
            serde_json::from_value(serde_json::json!({"routes": [{"name": "r", "model": "m",
                "backends": [{"name": "b", "provider": "bedrock", "bedrock": settings}]}]}))
            .unwrap()
        };
        let at = "routes[0] (r).backends[0] (b).bedrock";
        assert_eq!(
            problems(&bedrock(serde_json::json!({"region": "us-east-1",
                "auth": "podIdentity", "credentialsUri": "http://127.0.0.1:1/creds",
                "authorizationTokenFile": "/var/run/token"}))),
            ""
        );
        let bad = problems(&bedrock(serde_json::json!({"region": "us-east-1",
            "auth": "podIdentity", "roleArn": "arn:aws:iam::1:role/r",
            "credentialsUri": "not a url"})));
        for want in [
            format!("{at}.roleArn: applies only with auth: webIdentity"),
            format!("{at}.credentialsUri: "),
        ] {
            assert!(bad.contains(&want), "{want} in {bad}");
        }
        let bad = problems(&bedrock(serde_json::json!({"region": "us-east-1",
            "auth": "webIdentity", "roleArn": "arn:aws:iam::1:role/r",
            "authorizationTokenFile": "/t"})));
        assert!(
            bad.contains(&format!(
                "{at}.authorizationTokenFile: applies only with auth: podIdentity"
            )),
            "{bad}"
        );
        let mut with_keys =
            bedrock(serde_json::json!({"region": "us-east-1", "auth": "podIdentity"}));
        with_keys.routes[0].backends[0].credentials = Some(crate::CredentialSpec {
            value: Some("k".into()),
            ..Default::default()
        });
        assert!(
            problems(&with_keys).contains("signs with the proxy's own cloud identity"),
            "{}",
            problems(&with_keys)
        );
    }

    #[test]
    fn azure_classic_and_v1_shapes_are_accepted() {
        let classic = azure(
            Some("https://myres.openai.azure.com"),
            spec(Some("gpt-4o"), Some("2024-10-21")),
            true,
        );
        assert_eq!(problems(&classic), "");
        let v1 = azure(
            Some("https://myres.openai.azure.com/openai/v1/"),
            None,
            true,
        );
        assert_eq!(problems(&v1), "");
        let bearer: SnapshotSpec = serde_json::from_str(
            r#"{"routes":[{"name":"r","model":"m","backends":[{"name":"az","provider":"azure-openai",
            "url":"https://r.openai.azure.com/openai/v1","credentials":{"value":"t"},
            "azure":{"auth":"bearer"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(problems(&bearer), "");
        assert_eq!(
            bearer.routes[0].backends[0].azure.as_ref().unwrap().auth,
            crate::AzureAuth::Bearer
        );
    }

    #[test]
    fn azure_mistakes_are_named_with_their_path() {
        let cases: Vec<(SnapshotSpec, String)> = vec![
            (
                azure(None, spec(Some("d"), Some("v")), true),
                format!("{AT}: url is required for provider azure-openai"),
            ),
            (
                azure(
                    Some("https://r.openai.azure.com"),
                    spec(Some("d"), Some("v")),
                    false,
                ),
                format!("{AT}: provider azure-openai needs credentials"),
            ),
            (
                azure(Some("https://r.openai.azure.com"), None, true),
                format!("{AT}.azure.deployment: is required unless url ends in /openai/v1"),
            ),
            (
                azure(
                    Some("https://r.openai.azure.com"),
                    spec(Some("d"), None),
                    true,
                ),
                format!("{AT}.azure.apiVersion: is required with azure.deployment"),
            ),
            (
                azure(
                    Some("https://r.openai.azure.com/openai/v1"),
                    spec(Some("d"), None),
                    true,
                ),
                format!("{AT}.azure.deployment: must be absent when url ends in /openai/v1"),
            ),
            (
                azure(
                    Some("https://r.openai.azure.com/openai/v1"),
                    spec(None, Some("2024-10-21")),
                    true,
                ),
                format!("{AT}.azure.apiVersion: must be absent when url ends in /openai/v1"),
            ),
            (
                azure(
                    Some("https://r.openai.azure.com"),
                    spec(Some("my deployment"), Some("v")),
                    true,
                ),
                format!("{AT}.azure.deployment: must be a deployment name"),
            ),
            (
                azure(
                    Some("https://r.openai.azure.com"),
                    spec(Some("d"), Some("2024-10-21&x=1")),
                    true,
                ),
                format!("{AT}.azure.apiVersion: must be a version"),
            ),
            (
                azure(
                    Some("https://r.openai.azure.com/openai"),
                    spec(Some("d"), Some("v")),
                    true,
                ),
                format!("{AT}.url: must be the resource endpoint"),
            ),
            (
                azure(
                    Some("https://r.openai.azure.com/openai/deployments/d"),
                    spec(Some("d"), Some("v")),
                    true,
                ),
                format!("{AT}.url: must be the resource endpoint"),
            ),
        ];
        for (s, want) in cases {
            let got = problems(&s);
            assert!(got.contains(&want), "want {want:?} in {got:?}");
        }
        // An auth this proxy does not know, and settings on another provider.
        let other: SnapshotSpec = serde_json::from_str(
            r#"{"routes":[{"name":"r","model":"m","backends":[
              {"name":"az","provider":"azure-openai","url":"https://r.openai.azure.com/openai/v1",
               "credentials":{"value":"k"},"azure":{"auth":"managedIdentity"}},
              {"name":"o","provider":"openai-compatible","url":"http://h/v1","azure":{}}]}]}"#,
        )
        .unwrap();
        let got = problems(&other);
        assert!(
            got.contains(&format!("{AT}.azure.auth: must be apiKey or bearer")),
            "{got}"
        );
        assert!(
            got.contains("backends[1] (o): azure settings apply only to provider azure-openai"),
            "{got}"
        );
    }
}
