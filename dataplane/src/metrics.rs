//! The proxy's Prometheus metrics.
//!
//! `prometheus-client` (the official Rust client) gives typed label sets, so a label can only
//! ever be a route, backend or key name from the snapshot, a status code or a fixed word —
//! never request data, never a secret. Exposed in the Prometheus text format on the admin port.
//!
//! The request path builds no label set: the handles of a key, a route, a backend and of each
//! route and backend a key's traffic went through are resolved once, kept by name, and shared
//! by every request and every snapshot that holds the object.
//!
//! ```text
//!  Metrics ─┬─► KeySeries (key id) ──► TrafficSeries (route, backend): requests by status,
//!           │       └ limit rejections                                 tokens, cost
//!           ├─► RouteSeries (route id): duration, fallbacks; the response cache's requests
//!           │       by result, tokens and cost saved (cached on the route's cache policy)
//!           ├─► BackendSeries (route, backend; cached on the Backend): time to first token,
//!           │       estimated usage, retries, ejections, upstream errors by kind; on a
//!           │       route with a shadow, its calls side by side with the shadow's
//!           │       (`backend_*{shadow="false"|"true"}`), shadow calls in flight and skipped
//!           └─► RuleSeries (route, masking rule; cached on the compiled rule): matches by
//!                   action and direction
//! ```
//!
//! A snapshot swap takes a [`Census`] of the names the new snapshot holds: keys, routes,
//! backends and each route's masking rules. The series of a name it no longer holds stay for
//! the grace ([`SERIES_GRACE`] unless the proxy was started with another), so their last
//! values get scraped, and are then removed from the families (`Family::remove`) once no
//! request and no snapshot still alive uses them: a proxy that churns through keys, routes
//! or rules does not grow its `/metrics` without bound. A name that comes back within the
//! grace keeps its series. A rule dropped from a route that stays is a name dropped too.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub backend: String,
    pub key: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TokenKind {
    /// Prompt tokens neither read from nor written to a cache.
    Input,
    Output,
    CacheRead,
    CacheWrite,
    /// Part of `output`, never to be added to it.
    Reasoning,
}

impl TokenKind {
    const ALL: [Self; 5] = [
        Self::Input,
        Self::Output,
        Self::CacheRead,
        Self::CacheWrite,
        Self::Reasoning,
    ];
}

impl EncodeLabelValue for TokenKind {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(match self {
            Self::Input => "input",
            Self::Output => "output",
            Self::CacheRead => "cache_read",
            Self::CacheWrite => "cache_write",
            Self::Reasoning => "reasoning",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub route: String,
    pub backend: String,
    pub key: String,
    pub kind: TokenKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub route: String,
    pub backend: String,
    pub key: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    /// 429 with a `Retry-After`.
    RateLimited,
    /// 429 without one.
    RateLimitedNoWait,
    /// Anthropic's 529 or an `overloaded_error` body: busy, not broken.
    Overloaded,
    /// 429 `insufficient_quota`: the account is out of credit; this backend is not asked
    /// again for the request.
    QuotaExhausted,
    ServerError,
    Stream,
    /// The upstream refused the gateway's own credentials (401/403).
    CredentialsRefused,
    /// 400: the prompt does not fit the model's context window.
    ContextLength,
}

impl UpstreamErrorKind {
    const ALL: [Self; 10] = [
        Self::Connect,
        Self::Timeout,
        Self::RateLimited,
        Self::RateLimitedNoWait,
        Self::Overloaded,
        Self::QuotaExhausted,
        Self::ServerError,
        Self::Stream,
        Self::CredentialsRefused,
        Self::ContextLength,
    ];
}

impl UpstreamErrorKind {
    /// The label value (also a trace's `error.type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::RateLimitedNoWait => "rate_limited_no_wait",
            Self::Overloaded => "overloaded",
            Self::QuotaExhausted => "quota_exhausted",
            Self::ServerError => "server_error",
            Self::Stream => "stream_broken",
            Self::CredentialsRefused => "credentials_refused",
            Self::ContextLength => "context_length",
        }
    }
}

impl EncodeLabelValue for UpstreamErrorKind {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub route: String,
    pub backend: String,
    pub kind: UpstreamErrorKind,
}

/// A retry or a fallback, and the failure that caused it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub route: String,
    pub backend: String,
    pub reason: UpstreamErrorKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub route: String,
    pub reason: UpstreamErrorKind,
}

/// How one call of a backend ended, for the side-by-side series of a route with a shadow.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CallOutcome {
    /// A whole answer (or a stream to its end) with a 2xx status.
    Ok,
    /// The backend (or the translation to it) refused the request with a 4xx: a candidate
    /// that refuses what the primary takes shows here.
    ClientError,
    /// No answer: connection, 5xx, 429, refused credentials, a broken or unreadable answer.
    Error,
    /// No whole answer in time.
    Timeout,
}

impl CallOutcome {
    const ALL: [Self; 4] = [Self::Ok, Self::ClientError, Self::Error, Self::Timeout];
}

impl EncodeLabelValue for CallOutcome {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(match self {
            Self::Ok => "ok",
            Self::ClientError => "client_error",
            Self::Error => "error",
            Self::Timeout => "timeout",
        })
    }
}

/// Why a sampled request was not mirrored to its route's shadow.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SkipReason {
    /// The route's shadow calls were all in flight (`maxInFlight`).
    MaxInFlight,
    /// The shadow's worst case was above the route's `maxCostPerRequest`.
    CostGuard,
}

impl SkipReason {
    const ALL: [Self; 2] = [Self::MaxInFlight, Self::CostGuard];
}

impl EncodeLabelValue for SkipReason {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(match self {
            Self::MaxInFlight => "max_in_flight",
            Self::CostGuard => "cost_guard",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComparedLabels {
    pub route: String,
    pub backend: String,
    pub shadow: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComparedRequestLabels {
    pub route: String,
    pub backend: String,
    pub shadow: bool,
    pub outcome: CallOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComparedTokenLabels {
    pub route: String,
    pub backend: String,
    pub shadow: bool,
    pub kind: TokenKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    pub route: String,
    pub backend: String,
    pub reason: SkipReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub key: String,
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// How long the series of a key, route, backend or masking rule stay after a snapshot swap
/// dropped it, so that scrapes see their last values, unless the proxy is told otherwise
/// (`--series-grace`).
pub const SERIES_GRACE: Duration = Duration::from_secs(5 * 60);

pub struct Metrics {
    registry: Registry,
    /// The families labelled by key, route or backend: reached only through series handles.
    families: Arc<Families>,
    keys: Index<Arc<str>, KeySeries>,
    routes: Index<Arc<str>, RouteSeries>,
    backends: Index<(Arc<str>, Arc<str>), BackendSeries>,
    rules: Index<(Arc<str>, Arc<str>), RuleSeries>,
    /// How long the series of a name no snapshot in force holds stay.
    grace: Duration,
    /// Requests that never had a key (no or an unknown one): never removed.
    anonymous: Arc<KeySeries>,
    /// Bumped by every census: an entry seen by the latest one is held by the snapshot in force.
    generation: AtomicU64,
    /// One census at a time.
    census: Mutex<()>,
    pub overhead: Histogram,
    pub in_flight: Gauge,
    pub connections_refused: Counter,
    pub snapshot_info: Family<VersionLabels, Gauge>,
    pub reloads: Family<ResultLabels, Counter>,
    pub last_reload_success: Gauge,
    pub last_reload_timestamp: Gauge,
    pub operator_stream_failures: Counter,
    pub access_log_dropped: Counter,
    /// Spans the OTLP exporter delivered, and those of batches it could not deliver.
    pub trace_spans_exported: Counter,
    pub trace_spans_failed: Counter,
    /// The response cache's series (`cache.rs`); a route's are reached through its
    /// [`RouteSeries`].
    pub cache: crate::cache::CacheMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MaskingLabels {
    pub route: String,
    pub rule: String,
    pub action: &'static str,
    pub direction: &'static str,
}

pub use modelgate_wire::openmetrics_to_prometheus;

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ]
    .into_iter()
}

fn overhead_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_01, 0.000_02, 0.000_03, 0.000_04, 0.000_05, 0.000_075, 0.000_1, 0.000_25, 0.000_5,
        0.001, 0.002_5, 0.01, 0.05,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_series_grace(SERIES_GRACE)
    }

    /// Metrics whose series of dropped names stay for `grace` (tests shorten it).
    pub fn with_series_grace(grace: Duration) -> Self {
        let mut registry = Registry::with_prefix("modelgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, backend, key and response status",
            requests.clone(),
        );
        let request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "request_duration_seconds",
            "Time from request start to the last response byte",
            request_duration.clone(),
        );
        let ttft = Family::<BackendLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "time_to_first_token_seconds",
            "Time from request start to the first streamed token sent to the client",
            ttft.clone(),
        );
        let overhead = Histogram::new(overhead_buckets());
        registry.register(
            "gateway_overhead_seconds",
            "The proxy's own busy time per request: its client and upstream connections' work (reading, parsing, the gateway's code, writing), never the wait for an upstream",
            overhead.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens metered from upstream usage",
            tokens.clone(),
        );
        let usage_estimated = Family::<BackendLabels, Counter>::default();
        registry.register(
            "usage_estimated",
            "Requests charged from the gateway's estimate because the upstream reported no usage",
            usage_estimated.clone(),
        );
        let cost = Family::<CostLabels, Counter<f64, AtomicU64>>::default();
        registry.register("cost_usd", "Cost in USD from backend pricing", cost.clone());
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream attempts by kind",
            upstream_errors.clone(),
        );
        let rejected = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_rejections",
            "Requests refused by a key's rate limit, concurrency limit or budget, or by a spend guard (limit: route_max_cost_per_request, key_max_cost_per_request)",
            rejected.clone(),
        );
        let backend_requests = Family::<ComparedRequestLabels, Counter>::default();
        registry.register(
            "backend_requests",
            "Calls of each backend of a route with a shadow, the shadow's (shadow=\"true\") beside the primary's, by outcome (ok, client_error, error, timeout)",
            backend_requests.clone(),
        );
        let backend_duration = Family::<ComparedLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "backend_request_duration_seconds",
            "Duration of the calls of each backend of a route with a shadow, to the answer's last byte (the primary's: the client's request, retries included)",
            backend_duration.clone(),
        );
        let backend_tokens = Family::<ComparedTokenLabels, Counter>::default();
        registry.register(
            "backend_tokens",
            "Tokens of the calls of each backend of a route with a shadow, by kind",
            backend_tokens.clone(),
        );
        let backend_cost = Family::<ComparedLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "backend_cost_usd",
            "Cost in USD of the calls of each backend of a route with a shadow, from its pricing",
            backend_cost.clone(),
        );
        let shadow_in_flight = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "shadow_in_flight",
            "Shadow calls under way, by route and shadow backend",
            shadow_in_flight.clone(),
        );
        let shadow_skipped = Family::<SkipLabels, Counter>::default();
        registry.register(
            "shadow_skipped",
            "Sampled requests not mirrored to the route's shadow, by reason (max_in_flight, cost_guard)",
            shadow_skipped.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "retries",
            "Attempts retried after a failure, by the failure (reason: an upstream error kind)",
            retries.clone(),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Requests that fell through to a lower priority tier, by the failure that made them",
            fallbacks.clone(),
        );
        let ejections = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_ejections",
            "Backends ejected by passive outlier detection",
            ejections.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being served",
            in_flight.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections closed at accept because the connection limit was reached",
            connections_refused.clone(),
        );
        let snapshot_info = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "snapshot_info",
            "The config snapshot version in force (value 1)",
            snapshot_info.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("config_reloads", "Config loads by result", reloads.clone());
        let last_reload_success = Gauge::default();
        registry.register(
            "config_last_reload_success",
            "1 when the last config load was applied, 0 when it was rejected",
            last_reload_success.clone(),
        );
        let last_reload_timestamp = Gauge::default();
        registry.register(
            "config_last_reload_timestamp_seconds",
            "Unix time of the last config load attempt",
            last_reload_timestamp.clone(),
        );
        let masking = Family::<MaskingLabels, Counter>::default();
        registry.register(
            "masking",
            "Text found by a route's masking rules, by route, rule, action (redact, mask, block) and direction (prompt, answer)",
            masking.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the log reader could not keep up",
            access_log_dropped.clone(),
        );
        let trace_spans_exported = Counter::default();
        registry.register(
            "trace_spans_exported",
            "Spans delivered to the OTLP endpoint (server.tracing)",
            trace_spans_exported.clone(),
        );
        let trace_spans_failed = Counter::default();
        registry.register(
            "trace_spans_export_failed",
            "Spans of batches the OTLP endpoint did not accept in time (down, slow, refusing)",
            trace_spans_failed.clone(),
        );
        let operator_stream_failures = Counter::default();
        registry.register(
            "operator_stream_failures",
            "Config streams to the operator that failed or were refused (TLS, token, network)",
            operator_stream_failures.clone(),
        );
        let cache = crate::cache::CacheMetrics::register(&mut registry);
        let families = Arc::new(Families {
            cache: cache.routes.clone(),
            masking,
            requests,
            request_duration,
            ttft,
            tokens,
            usage_estimated,
            cost,
            upstream_errors,
            rejected,
            retries,
            fallbacks,
            ejections,
            backend_requests,
            backend_duration,
            backend_tokens,
            backend_cost,
            shadow_in_flight,
            shadow_skipped,
            resolved: AtomicU64::new(0),
        });
        Self {
            cache,
            registry,
            operator_stream_failures,
            access_log_dropped,
            trace_spans_exported,
            trace_spans_failed,
            anonymous: Arc::new(KeySeries::new(families.clone(), "".into())),
            families,
            keys: Index::default(),
            routes: Index::default(),
            backends: Index::default(),
            rules: Index::default(),
            grace,
            generation: AtomicU64::new(0),
            census: Mutex::new(()),
            overhead,
            in_flight,
            connections_refused,
            snapshot_info,
            reloads,
            last_reload_success,
            last_reload_timestamp,
        }
    }

    /// OpenMetrics text, for scrapers that ask for it.
    pub fn encode_openmetrics(&self) -> String {
        self.sweep(Instant::now());
        self.access_log_dropped.inner().store(
            crate::accesslog::dropped_lines(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4): what `promtool check metrics` and
    /// scrapers without OpenMetrics support read.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }

    pub fn record_operator_connect_failure(&self) {
        self.operator_stream_failures.inc();
    }

    pub fn record_reload(&self, version: Option<&str>, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "applied" } else { "rejected" },
            })
            .inc();
        self.last_reload_success.set(i64::from(ok));
        self.last_reload_timestamp
            .set(crate::admission::unix_now() as i64);
        if let Some(v) = version {
            self.snapshot_info.clear();
            self.snapshot_info
                .get_or_create(&VersionLabels {
                    version: v.to_owned(),
                })
                .set(1);
        }
    }

    /// The series of key `id` (`""`: a request that had none). Found by name, so every
    /// snapshot that holds the key counts into the same ones; no label set is built.
    pub fn key(&self, id: &str) -> Arc<KeySeries> {
        if id.is_empty() {
            return self.anonymous.clone();
        }
        self.keys.get_or_insert(id, &self.generation, || {
            let id: Arc<str> = id.into();
            (id.clone(), KeySeries::new(self.families.clone(), id))
        })
    }

    /// The series of route `id`.
    pub fn route(&self, id: &str) -> Arc<RouteSeries> {
        self.routes.get_or_insert(id, &self.generation, || {
            let id: Arc<str> = id.into();
            let series = RouteSeries {
                families: self.families.clone(),
                id: id.clone(),
                duration: OnceLock::new(),
                fallbacks: Default::default(),
                cache: OnceLock::new(),
            };
            (id, series)
        })
    }

    /// The series of backend `name` of route `route`. The request path reaches them through
    /// `Backend::series`, which asks here once per backend object.
    pub fn backend(&self, route: &str, name: &str) -> Arc<BackendSeries> {
        let name: (Arc<str>, Arc<str>) = (route.into(), name.into());
        self.backends.get_or_insert(&name, &self.generation, || {
            let series = BackendSeries::new(self.families.clone(), &name);
            (name.clone(), series)
        })
    }

    /// The series of masking rule `rule` of route `route`. The request path reaches them
    /// through the compiled rule, which asks here once per rule object.
    pub fn masking_rule(&self, route: &str, rule: &str) -> Arc<RuleSeries> {
        let name: (Arc<str>, Arc<str>) = (route.into(), rule.into());
        self.rules.get_or_insert(&name, &self.generation, || {
            let series = RuleSeries {
                families: self.families.clone(),
                route: name.0.clone(),
                rule: name.1.clone(),
                counts: ByValue::default(),
            };
            (name.clone(), series)
        })
    }

    /// Start telling which names a new snapshot holds; see [`Census`].
    pub fn census(&self) -> Census<'_> {
        let one_at_a_time = lock(&self.census);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        // Series made from here on count as seen by this census, so empty indexes need no
        // marking: a snapshot of 100k keys none of which has series yet costs nothing.
        Census {
            metrics: self,
            generation,
            keys: !self.keys.is_empty(),
            routes: !self.routes.is_empty(),
            backends: !self.backends.is_empty(),
            rules: !self.rules.is_empty(),
            _one_at_a_time: one_at_a_time,
        }
    }

    /// Remove the series of names that no snapshot in force held for the whole grace up to
    /// `now` and that nothing uses any more (no request, no backend of a snapshot still
    /// alive). Runs at every scrape and every census; tests pass their own `now`.
    pub fn sweep(&self, now: Instant) {
        let Some(cutoff) = now.checked_sub(self.grace) else {
            return;
        };
        // Most scrapes find nothing to remove: they take no write lock, so no request waits.
        if !(self.keys.has_expired(cutoff)
            || self.routes.has_expired(cutoff)
            || self.backends.has_expired(cutoff)
            || self.rules.has_expired(cutoff))
        {
            return;
        }
        // A rule's series are its own: no other series refers to them.
        for rule in expire(&mut write(&self.rules.map), cutoff) {
            rule.remove();
        }
        // Routes and backends stay locked until the traffic through them is gone as well, so
        // a request finds new series for a name only once all of the old ones are removed.
        let mut routes = write(&self.routes.map);
        let mut backends = write(&self.backends.map);
        let gone_routes = expire(&mut routes, cutoff);
        let gone_backends = expire(&mut backends, cutoff);
        let mut keys = write(&self.keys.map);
        for key in expire(&mut keys, cutoff) {
            key.remove();
        }
        if gone_routes.is_empty() && gone_backends.is_empty() {
            return;
        }
        gone_routes.iter().for_each(|r| r.remove());
        gone_backends.iter().for_each(|b| b.remove());
        let gone_routes: HashSet<&str> = gone_routes.iter().map(|r| &*r.id).collect();
        let gone_backends: HashSet<(&str, &str)> = gone_backends
            .iter()
            .map(|b| (&*b.route, &*b.name))
            .collect();
        let gone = |t: &TrafficSeries| {
            if t.backend.is_empty() {
                gone_routes.contains(&*t.route)
            } else {
                gone_backends.contains(&(&*t.route, &*t.backend))
            }
        };
        for key in keys.values().map(|e| &e.series).chain([&self.anonymous]) {
            key.forget_traffic(gone);
        }
    }

    /// Label sets looked up in a family so far.
    #[cfg(test)]
    pub(crate) fn label_sets_resolved(&self) -> u64 {
        self.families.resolved.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The names one snapshot holds, told to [`Metrics`] before the snapshot goes live: the series
/// of names it keeps carry over (a backend object is handed its existing ones), those of names
/// it dropped start their grace.
pub struct Census<'a> {
    metrics: &'a Metrics,
    generation: u64,
    keys: bool,
    routes: bool,
    backends: bool,
    rules: bool,
    _one_at_a_time: MutexGuard<'a, ()>,
}

impl Census<'_> {
    pub fn key(&self, id: &str) {
        if self.keys {
            self.metrics.keys.mark(id, self.generation);
        }
    }

    pub fn route(&self, id: &str) {
        if self.routes {
            self.metrics.routes.mark(id, self.generation);
        }
    }

    /// Marks a backend; its existing series, if it has any, for the snapshot's `Backend`.
    pub fn backend(&self, route: &str, name: &str) -> Option<Arc<BackendSeries>> {
        if !self.backends {
            return None;
        }
        let name: (Arc<str>, Arc<str>) = (route.into(), name.into());
        self.metrics.backends.mark(&name, self.generation)
    }

    /// Marks masking rule `rule` of route `route`.
    pub fn masking_rule(&self, route: &str, rule: &str) {
        if self.rules {
            let name: (Arc<str>, Arc<str>) = (route.into(), rule.into());
            self.metrics.rules.mark(&name, self.generation);
        }
    }

    /// Every name is told: those not told are absent from `now` on.
    pub fn finish(self, now: Instant) {
        let m = self.metrics;
        m.keys.retire(self.generation, now);
        m.routes.retire(self.generation, now);
        m.backends.retire(self.generation, now);
        m.rules.retire(self.generation, now);
        drop(self);
        m.sweep(now);
    }
}

/// The families labelled by key, route or backend, shared by the series handles so that each
/// can resolve and remove its own label sets.
struct Families {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    ttft: Family<BackendLabels, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    usage_estimated: Family<BackendLabels, Counter>,
    cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    rejected: Family<LimitLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    ejections: Family<BackendLabels, Counter>,
    backend_requests: Family<ComparedRequestLabels, Counter>,
    backend_duration: Family<ComparedLabels, Histogram>,
    backend_tokens: Family<ComparedTokenLabels, Counter>,
    backend_cost: Family<ComparedLabels, Counter<f64, AtomicU64>>,
    shadow_in_flight: Family<BackendLabels, Gauge>,
    shadow_skipped: Family<SkipLabels, Counter>,
    /// The response cache's families labelled by route.
    cache: crate::cache::RouteFamilies,
    masking: Family<MaskingLabels, Counter>,
    /// Label sets looked up so far: once per series, never per request.
    resolved: AtomicU64,
}

impl Families {
    /// The handle of one label set, made on its first use.
    fn once<'a, S, M, C>(
        &self,
        slot: &'a OnceLock<M>,
        family: &Family<S, M, C>,
        labels: impl FnOnce() -> S,
    ) -> &'a M
    where
        S: Clone + Hash + Eq,
        M: Clone,
        C: MetricConstructor<M>,
    {
        slot.get_or_init(|| self.resolve(family, &labels()))
    }

    fn resolve<S, M, C>(&self, family: &Family<S, M, C>, labels: &S) -> M
    where
        S: Clone + Hash + Eq,
        M: Clone,
        C: MetricConstructor<M>,
    {
        self.resolved.fetch_add(1, Ordering::Relaxed);
        family.get_or_create_owned(labels)
    }
}

/// The handles of one key, and of its traffic through each route and backend.
pub struct KeySeries {
    families: Arc<Families>,
    id: Arc<str>,
    rejections: ByValue<&'static str, Counter>,
    /// A few per key: the routes and backends it was used with.
    traffic: RwLock<Vec<Arc<TrafficSeries>>>,
}

impl KeySeries {
    fn new(families: Arc<Families>, id: Arc<str>) -> Self {
        Self {
            families,
            id,
            rejections: ByValue::default(),
            traffic: RwLock::default(),
        }
    }

    /// Requests of this key refused by `limit`.
    pub fn rejected(&self, limit: &'static str) -> Counter {
        self.rejections.get(limit, || {
            let labels = LimitLabels {
                key: self.id.to_string(),
                limit,
            };
            self.families.resolve(&self.families.rejected, &labels)
        })
    }

    /// This key's requests through `route` and `backend` (`""` where none was reached).
    pub fn traffic(&self, route: &str, backend: &str) -> Arc<TrafficSeries> {
        let find = |list: &[Arc<TrafficSeries>]| {
            list.iter()
                .find(|t| &*t.route == route && &*t.backend == backend)
                .cloned()
        };
        if let Some(t) = find(&read(&self.traffic)) {
            return t;
        }
        let mut list = write(&self.traffic);
        if let Some(t) = find(&list) {
            return t;
        }
        let t = Arc::new(TrafficSeries {
            families: self.families.clone(),
            route: route.into(),
            backend: backend.into(),
            key: self.id.clone(),
            requests: ByValue::default(),
            tokens: Default::default(),
            cost: OnceLock::new(),
        });
        list.push(t.clone());
        t
    }

    fn forget_traffic(&self, gone: impl Fn(&TrafficSeries) -> bool) {
        write(&self.traffic).retain(|t| {
            let forget = gone(t);
            if forget {
                t.remove();
            }
            !forget
        });
    }

    fn remove(&self) {
        for limit in self.rejections.values() {
            self.families.rejected.remove(&LimitLabels {
                key: self.id.to_string(),
                limit,
            });
        }
        read(&self.traffic).iter().for_each(|t| t.remove());
    }
}

/// The handles of one key's requests through one route and backend.
pub struct TrafficSeries {
    families: Arc<Families>,
    route: Box<str>,
    backend: Box<str>,
    key: Arc<str>,
    requests: ByValue<u16, Counter>,
    tokens: [OnceLock<Counter>; TokenKind::ALL.len()],
    cost: OnceLock<Counter<f64, AtomicU64>>,
}

impl TrafficSeries {
    /// Requests answered with `status`.
    pub fn requests(&self, status: u16) -> Counter {
        self.requests.get(status, || {
            let labels = self.request_labels(status);
            self.families.resolve(&self.families.requests, &labels)
        })
    }

    pub fn tokens(&self, kind: TokenKind) -> &Counter {
        let f = &self.families;
        f.once(&self.tokens[kind as usize], &f.tokens, || {
            self.token_labels(kind)
        })
    }

    pub fn cost(&self) -> &Counter<f64, AtomicU64> {
        let f = &self.families;
        f.once(&self.cost, &f.cost, || self.cost_labels())
    }

    fn request_labels(&self, status: u16) -> RequestLabels {
        RequestLabels {
            route: self.route.to_string(),
            backend: self.backend.to_string(),
            key: self.key.to_string(),
            status,
        }
    }

    fn token_labels(&self, kind: TokenKind) -> TokenLabels {
        TokenLabels {
            route: self.route.to_string(),
            backend: self.backend.to_string(),
            key: self.key.to_string(),
            kind,
        }
    }

    fn cost_labels(&self) -> CostLabels {
        CostLabels {
            route: self.route.to_string(),
            backend: self.backend.to_string(),
            key: self.key.to_string(),
        }
    }

    fn remove(&self) {
        let f = &self.families;
        for status in self.requests.values() {
            f.requests.remove(&self.request_labels(status));
        }
        for kind in TokenKind::ALL {
            f.tokens.remove(&self.token_labels(kind));
        }
        f.cost.remove(&self.cost_labels());
    }
}

/// The handles of one route.
pub struct RouteSeries {
    families: Arc<Families>,
    id: Arc<str>,
    duration: OnceLock<Histogram>,
    fallbacks: [OnceLock<Counter>; UpstreamErrorKind::ALL.len()],
    cache: OnceLock<crate::cache::Series>,
}

impl RouteSeries {
    /// The response cache's handles of this route.
    pub fn cache(&self) -> &crate::cache::Series {
        self.cache.get_or_init(|| {
            let f = &self.families;
            f.resolved
                .fetch_add(crate::cache::Series::LABEL_SETS, Ordering::Relaxed);
            f.cache.series(&self.id)
        })
    }

    pub fn duration(&self) -> &Histogram {
        let f = &self.families;
        f.once(&self.duration, &f.request_duration, || self.labels())
    }

    /// Fallbacks to a lower tier after a failure of `reason`.
    pub fn fallbacks(&self, reason: UpstreamErrorKind) -> &Counter {
        let f = &self.families;
        f.once(&self.fallbacks[reason as usize], &f.fallbacks, || {
            FallbackLabels {
                route: self.id.to_string(),
                reason,
            }
        })
    }

    fn labels(&self) -> RouteLabels {
        RouteLabels {
            route: self.id.to_string(),
        }
    }

    fn remove(&self) {
        let labels = self.labels();
        self.families.request_duration.remove(&labels);
        for reason in UpstreamErrorKind::ALL {
            self.families.fallbacks.remove(&FallbackLabels {
                route: self.id.to_string(),
                reason,
            });
        }
        self.families.cache.remove(&self.id);
    }
}

impl std::fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSeries")
            .field("route", &self.id)
            .finish_non_exhaustive()
    }
}

/// The handles of one masking rule of one route.
pub struct RuleSeries {
    families: Arc<Families>,
    route: Arc<str>,
    rule: Arc<str>,
    /// By action and direction: a few per rule (a block redacts in answers).
    counts: ByValue<(&'static str, &'static str), Counter>,
}

impl RuleSeries {
    /// Text this rule found, by what was done with it (`redact`, `mask`, `block`) and
    /// where (`prompt`, `answer`).
    pub fn matches(&self, action: &'static str, direction: &'static str) -> Counter {
        self.counts.get((action, direction), || {
            let labels = self.labels(action, direction);
            self.families.resolve(&self.families.masking, &labels)
        })
    }

    fn labels(&self, action: &'static str, direction: &'static str) -> MaskingLabels {
        MaskingLabels {
            route: self.route.to_string(),
            rule: self.rule.to_string(),
            action,
            direction,
        }
    }

    fn remove(&self) {
        for (action, direction) in self.counts.values() {
            self.families
                .masking
                .remove(&self.labels(action, direction));
        }
    }
}

impl std::fmt::Debug for RuleSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSeries")
            .field("route", &self.route)
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

/// The handles of one backend of one route.
pub struct BackendSeries {
    families: Arc<Families>,
    route: Arc<str>,
    name: Arc<str>,
    ttft: OnceLock<Histogram>,
    usage_estimated: OnceLock<Counter>,
    retries: [OnceLock<Counter>; UpstreamErrorKind::ALL.len()],
    ejections: OnceLock<Counter>,
    upstream_errors: [OnceLock<Counter>; UpstreamErrorKind::ALL.len()],
    /// The side-by-side series of its calls as a primary backend and as a shadow (a
    /// candidate promoted from shadow to backend keeps its name, and so these handles).
    compared: [ComparedSeries; 2],
    shadow_in_flight: OnceLock<Gauge>,
    shadow_skipped: [OnceLock<Counter>; SkipReason::ALL.len()],
}

/// The handles of one backend's calls on a route with a shadow, as primary or as shadow.
#[derive(Default)]
struct ComparedSeries {
    requests: [OnceLock<Counter>; CallOutcome::ALL.len()],
    duration: OnceLock<Histogram>,
    tokens: [OnceLock<Counter>; TokenKind::ALL.len()],
    cost: OnceLock<Counter<f64, AtomicU64>>,
}

impl BackendSeries {
    fn new(families: Arc<Families>, (route, name): &(Arc<str>, Arc<str>)) -> Self {
        Self {
            families,
            route: route.clone(),
            name: name.clone(),
            ttft: OnceLock::new(),
            usage_estimated: OnceLock::new(),
            retries: Default::default(),
            ejections: OnceLock::new(),
            upstream_errors: Default::default(),
            compared: Default::default(),
            shadow_in_flight: OnceLock::new(),
            shadow_skipped: Default::default(),
        }
    }

    /// One call of this backend on a route with a shadow, recorded beside the other side's:
    /// `shadow` says whether it was the shadow's call.
    pub fn compare(
        &self,
        shadow: bool,
        outcome: CallOutcome,
        duration: Duration,
        usage: &crate::canonical::Usage,
        cost: f64,
    ) {
        let f = &self.families;
        let c = &self.compared[usize::from(shadow)];
        let labels = || ComparedLabels {
            route: self.route.to_string(),
            backend: self.name.to_string(),
            shadow,
        };
        f.once(&c.requests[outcome as usize], &f.backend_requests, || {
            ComparedRequestLabels {
                route: self.route.to_string(),
                backend: self.name.to_string(),
                shadow,
                outcome,
            }
        })
        .inc();
        f.once(&c.duration, &f.backend_duration, labels)
            .observe(duration.as_secs_f64());
        // Input and output whenever tokens were processed; cache and reasoning only where
        // the backend reports them, as for keys.
        let kinds = [
            (TokenKind::Input, Some(usage.input.unwrap_or(0))),
            (TokenKind::Output, Some(usage.output.unwrap_or(0))),
            (TokenKind::CacheRead, usage.cache_read),
            (TokenKind::CacheWrite, usage.cache_write),
            (TokenKind::Reasoning, usage.reasoning),
        ];
        for (kind, n) in kinds.into_iter().filter(|_| usage.processed() > 0) {
            let Some(n) = n else { continue };
            f.once(&c.tokens[kind as usize], &f.backend_tokens, || {
                ComparedTokenLabels {
                    route: self.route.to_string(),
                    backend: self.name.to_string(),
                    shadow,
                    kind,
                }
            })
            .inc_by(n);
        }
        if cost > 0.0 {
            f.once(&c.cost, &f.backend_cost, labels).inc_by(cost);
        }
    }

    /// Shadow calls of this (shadow) backend under way.
    pub fn shadow_in_flight(&self) -> &Gauge {
        let f = &self.families;
        f.once(&self.shadow_in_flight, &f.shadow_in_flight, || {
            self.labels()
        })
    }

    /// Sampled requests not mirrored to this (shadow) backend, for `reason`.
    pub fn shadow_skipped(&self, reason: SkipReason) -> &Counter {
        let f = &self.families;
        f.once(
            &self.shadow_skipped[reason as usize],
            &f.shadow_skipped,
            || SkipLabels {
                route: self.route.to_string(),
                backend: self.name.to_string(),
                reason,
            },
        )
    }

    pub fn ttft(&self) -> &Histogram {
        let f = &self.families;
        f.once(&self.ttft, &f.ttft, || self.labels())
    }

    pub fn usage_estimated(&self) -> &Counter {
        let f = &self.families;
        f.once(&self.usage_estimated, &f.usage_estimated, || self.labels())
    }

    /// Retries of this backend after a failure of `reason`.
    pub fn retries(&self, reason: UpstreamErrorKind) -> &Counter {
        let f = &self.families;
        f.once(&self.retries[reason as usize], &f.retries, || {
            self.retry_labels(reason)
        })
    }

    fn retry_labels(&self, reason: UpstreamErrorKind) -> RetryLabels {
        RetryLabels {
            route: self.route.to_string(),
            backend: self.name.to_string(),
            reason,
        }
    }

    pub fn ejections(&self) -> &Counter {
        let f = &self.families;
        f.once(&self.ejections, &f.ejections, || self.labels())
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) -> &Counter {
        let f = &self.families;
        f.once(
            &self.upstream_errors[kind as usize],
            &f.upstream_errors,
            || self.error_labels(kind),
        )
    }

    fn labels(&self) -> BackendLabels {
        BackendLabels {
            route: self.route.to_string(),
            backend: self.name.to_string(),
        }
    }

    fn error_labels(&self, kind: UpstreamErrorKind) -> UpstreamErrorLabels {
        UpstreamErrorLabels {
            route: self.route.to_string(),
            backend: self.name.to_string(),
            kind,
        }
    }

    fn remove(&self) {
        let (f, labels) = (&self.families, self.labels());
        f.ttft.remove(&labels);
        f.usage_estimated.remove(&labels);
        f.ejections.remove(&labels);
        for kind in UpstreamErrorKind::ALL {
            f.upstream_errors.remove(&self.error_labels(kind));
            f.retries.remove(&self.retry_labels(kind));
        }
        let (route, backend) = (self.route.to_string(), self.name.to_string());
        for shadow in [false, true] {
            let compared = ComparedLabels {
                route: route.clone(),
                backend: backend.clone(),
                shadow,
            };
            f.backend_duration.remove(&compared);
            f.backend_cost.remove(&compared);
            for outcome in CallOutcome::ALL {
                f.backend_requests.remove(&ComparedRequestLabels {
                    route: route.clone(),
                    backend: backend.clone(),
                    shadow,
                    outcome,
                });
            }
            for kind in TokenKind::ALL {
                f.backend_tokens.remove(&ComparedTokenLabels {
                    route: route.clone(),
                    backend: backend.clone(),
                    shadow,
                    kind,
                });
            }
        }
        f.shadow_in_flight.remove(&labels);
        for reason in SkipReason::ALL {
            f.shadow_skipped.remove(&SkipLabels {
                route: route.clone(),
                backend: backend.clone(),
                reason,
            });
        }
    }
}

impl std::fmt::Debug for BackendSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSeries")
            .field("route", &self.route)
            .field("backend", &self.name)
            .finish_non_exhaustive()
    }
}

/// One handle per value of a label that varies per request over a few values (a status, a
/// limit), each made at the first request with that value.
struct ByValue<V, M>(RwLock<Vec<(V, M)>>);

impl<V, M> Default for ByValue<V, M> {
    fn default() -> Self {
        Self(RwLock::default())
    }
}

impl<V: Copy + PartialEq, M: Clone> ByValue<V, M> {
    fn get(&self, value: V, make: impl FnOnce() -> M) -> M {
        let find = |list: &[(V, M)]| {
            list.iter()
                .find(|(v, _)| *v == value)
                .map(|(_, m)| m.clone())
        };
        if let Some(m) = find(&read(&self.0)) {
            return m;
        }
        let mut list = write(&self.0);
        if let Some(m) = find(&list) {
            return m;
        }
        let m = make();
        list.push((value, m.clone()));
        m
    }

    fn values(&self) -> Vec<V> {
        read(&self.0).iter().map(|(v, _)| *v).collect()
    }
}

/// Series by name, with what the censuses said about each name.
struct Index<N, S> {
    map: RwLock<HashMap<N, Entry<S>, foldhash::fast::RandomState>>,
}

impl<N, S> Default for Index<N, S> {
    fn default() -> Self {
        Self {
            map: RwLock::new(HashMap::default()),
        }
    }
}

struct Entry<S> {
    series: Arc<S>,
    /// The last census that found the name, or that was under way when the series was made.
    seen: AtomicU64,
    /// Since when the snapshot in force has not held the name.
    absent_since: Option<Instant>,
}

impl<N: Hash + Eq, S> Index<N, S> {
    fn get_or_insert<Q>(
        &self,
        name: &Q,
        generation: &AtomicU64,
        make: impl FnOnce() -> (N, S),
    ) -> Arc<S>
    where
        N: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(e) = read(&self.map).get(name) {
            return e.series.clone();
        }
        let mut map = write(&self.map);
        if let Some(e) = map.get(name) {
            return e.series.clone();
        }
        let (name, series) = make();
        let series = Arc::new(series);
        let entry = Entry {
            series: series.clone(),
            seen: AtomicU64::new(generation.load(Ordering::SeqCst)),
            absent_since: None,
        };
        map.insert(name, entry);
        series
    }

    fn mark<Q>(&self, name: &Q, generation: u64) -> Option<Arc<S>>
    where
        N: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = read(&self.map);
        let e = map.get(name)?;
        e.seen.store(generation, Ordering::Relaxed);
        Some(e.series.clone())
    }

    fn is_empty(&self) -> bool {
        read(&self.map).is_empty()
    }

    fn has_expired(&self, cutoff: Instant) -> bool {
        read(&self.map).values().any(|e| e.expired(cutoff))
    }

    fn retire(&self, generation: u64, now: Instant) {
        for e in write(&self.map).values_mut() {
            if *e.seen.get_mut() == generation {
                e.absent_since = None;
            } else {
                e.absent_since.get_or_insert(now);
            }
        }
    }
}

impl<S> Entry<S> {
    /// Absent since `cutoff` or earlier, and held by nothing but the index.
    fn expired(&self, cutoff: Instant) -> bool {
        self.absent_since.is_some_and(|t| t <= cutoff) && Arc::strong_count(&self.series) == 1
    }
}

/// Take out of `map` the series absent since `cutoff` or longer that only the map holds.
fn expire<N, S>(
    map: &mut HashMap<N, Entry<S>, foldhash::fast::RandomState>,
    cutoff: Instant,
) -> Vec<Arc<S>> {
    let mut gone = Vec::new();
    map.retain(|_, e| {
        let expired = e.expired(cutoff);
        if expired {
            gone.push(e.series.clone());
        }
        !expired
    });
    gone
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_format_names_counters_like_their_samples() {
        let m = Metrics::new();
        m.key("default/k")
            .traffic("default/r", "b")
            .requests(200)
            .inc();
        let text = m.encode_prometheus();
        assert!(
            text.contains("# TYPE modelgate_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP modelgate_requests_total Requests"),
            "{text}"
        );
        assert!(text.contains("modelgate_requests_total{route=\"default/r\",backend=\"b\",key=\"default/k\",status=\"200\"} 1"));
        assert!(!text.contains("# EOF"));
        assert!(m.encode_openmetrics().ends_with("# EOF\n"));
    }

    /// What one request through `route` (backend `b`) with `key` records, with every kind
    /// of series a key, a route and a backend have.
    fn request(m: &Metrics, key: &str, route: &str) {
        let k = m.key(key);
        let t = k.traffic(route, "b");
        t.requests(200).inc();
        t.tokens(TokenKind::Input).inc_by(3);
        t.tokens(TokenKind::Output).inc_by(2);
        t.cost().inc_by(0.25);
        k.rejected("budget").inc();
        let r = m.route(route);
        r.duration().observe(0.1);
        r.fallbacks(UpstreamErrorKind::ServerError).inc();
        let b = m.backend(route, "b");
        b.ttft().observe(0.05);
        b.usage_estimated().inc();
        b.retries(UpstreamErrorKind::Timeout).inc();
        b.ejections().inc();
        b.upstream_error(UpstreamErrorKind::Timeout).inc();
    }

    /// Sample lines that mention `name` in a label.
    fn samples(m: &Metrics, name: &str) -> Vec<String> {
        let quoted = format!("\"{name}\"");
        m.encode_prometheus()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(&quoted))
            .map(str::to_owned)
            .collect()
    }

    /// Tell `m` a snapshot holding `keys` and `routes` (each with backend `b`) went live.
    fn swap(m: &Metrics, keys: &[&str], routes: &[&str]) {
        let census = m.census();
        for r in routes {
            census.route(r);
            census.backend(r, "b");
        }
        for k in keys {
            census.key(k);
        }
        census.finish(Instant::now());
    }

    #[test]
    fn a_series_is_resolved_once_and_then_only_counted() {
        let m = Metrics::new();
        request(&m, "default/k", "default/r");
        let resolved = m.label_sets_resolved();
        // requests, 2 token kinds, cost, rejections, duration, fallbacks, ttft, estimated
        // usage, retries, ejections, one upstream error kind.
        assert_eq!(resolved, 12);
        request(&m, "default/k", "default/r");
        assert_eq!(m.label_sets_resolved(), resolved, "label sets built again");
        let k = m.key("default/k");
        assert!(Arc::ptr_eq(&k, &m.key("default/k")));
        assert!(Arc::ptr_eq(
            &k.traffic("default/r", "b"),
            &k.traffic("default/r", "b")
        ));
        let text = m.encode_prometheus();
        assert!(
            text.contains("modelgate_requests_total{route=\"default/r\",backend=\"b\",key=\"default/k\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("modelgate_tokens_total{route=\"default/r\",backend=\"b\",key=\"default/k\",kind=\"input\"} 6"));
        assert!(text.contains(
            "modelgate_upstream_errors_total{route=\"default/r\",backend=\"b\",kind=\"timeout\"} 2"
        ));
        // A new status is a new label set, once.
        k.traffic("default/r", "b").requests(429).inc();
        k.traffic("default/r", "b").requests(429).inc();
        assert_eq!(m.label_sets_resolved(), resolved + 1);
    }

    #[test]
    fn series_of_names_a_snapshot_dropped_leave_after_the_grace() {
        let m = Metrics::new();
        request(&m, "default/gone", "default/old");
        request(&m, "default/stays", "default/kept");
        // The key that stays also went through the route that goes.
        request(&m, "default/stays", "default/old");
        swap(
            &m,
            &["default/gone", "default/stays"],
            &["default/old", "default/kept"],
        );
        let before = |name| samples(&m, name).len();
        let (gone, old, stays, kept) = (
            before("default/gone"),
            before("default/old"),
            before("default/stays"),
            before("default/kept"),
        );
        assert!(gone > 0 && old > 0 && stays > 0 && kept > 0);

        let t0 = Instant::now();
        swap(&m, &["default/stays"], &["default/kept"]);
        let t1 = Instant::now();
        // Within the grace everything is still scraped.
        m.sweep(t0 + SERIES_GRACE - Duration::from_millis(1));
        assert_eq!(samples(&m, "default/gone").len(), gone);
        assert_eq!(samples(&m, "default/old").len(), old);

        m.sweep(t1 + SERIES_GRACE);
        assert_eq!(samples(&m, "default/gone"), Vec::<String>::new());
        assert_eq!(samples(&m, "default/old"), Vec::<String>::new());
        // Only the traffic of the staying key through the removed route went with it.
        let through_old = samples(&m, "default/stays").len();
        assert!(through_old > 0 && through_old < stays);
        assert_eq!(samples(&m, "default/kept").len(), kept);
    }

    /// Tell `m` a snapshot holding `routes`, each with its masking rules, went live.
    fn swap_rules(m: &Metrics, routes: &[(&str, &[&str])], now: Instant) {
        let census = m.census();
        for (r, rules) in routes {
            census.route(r);
            for rule in *rules {
                census.masking_rule(r, rule);
            }
        }
        census.finish(now);
    }

    /// A cache hit and a redacted prompt on `route`, by each of `rules`.
    fn cached_and_masked(m: &Metrics, route: &str, rules: &[&str]) {
        let cache = m.route(route);
        cache.cache().hit.inc();
        cache.cache().tokens_saved.inc_by(7);
        cache.cache().cost_saved.inc_by(0.5);
        for rule in rules {
            m.masking_rule(route, rule)
                .matches("redact", "prompt")
                .inc();
        }
    }

    #[test]
    fn cache_and_masking_series_leave_with_their_route_or_rule_after_the_grace() {
        let grace = Duration::from_secs(30);
        let m = Metrics::with_series_grace(grace);
        cached_and_masked(&m, "default/old", &["cards"]);
        cached_and_masked(&m, "default/kept", &["emails", "dropped"]);
        let all: &[(&str, &[&str])] = &[
            ("default/old", &["cards"]),
            ("default/kept", &["emails", "dropped"]),
        ];
        swap_rules(&m, all, Instant::now());
        let lines = |metric: &str, name: &str| {
            samples(&m, name)
                .into_iter()
                .filter(|l| l.starts_with(metric))
                .collect::<Vec<_>>()
        };
        for route in ["default/old", "default/kept"] {
            assert_eq!(lines("modelgate_cache_requests_total", route).len(), 3);
            assert_eq!(lines("modelgate_cache_tokens_saved_total", route).len(), 1);
            assert_eq!(
                lines("modelgate_cache_cost_saved_usd_total", route).len(),
                1
            );
        }
        assert_eq!(lines("modelgate_masking_total", "dropped").len(), 1);

        // The route goes, and the kept route drops one of its rules.
        let t0 = Instant::now();
        swap_rules(&m, &[("default/kept", &["emails"])], t0);
        let t1 = Instant::now();
        m.sweep(t0 + grace - Duration::from_millis(1));
        assert_eq!(samples(&m, "default/old").len(), 6, "within the grace");
        assert_eq!(lines("modelgate_masking_total", "dropped").len(), 1);

        m.sweep(t1 + grace);
        assert_eq!(samples(&m, "default/old"), Vec::<String>::new());
        assert_eq!(samples(&m, "dropped"), Vec::<String>::new());
        let kept = samples(&m, "default/kept");
        assert_eq!(kept.len(), 6, "{kept:?}");
        assert!(kept.contains(
            &r#"modelgate_masking_total{route="default/kept",rule="emails",action="redact",direction="prompt"} 1"#.to_owned()
        ));
        assert!(kept.contains(
            &r#"modelgate_cache_requests_total{route="default/kept",result="hit"} 1"#.to_owned()
        ));

        // Back after the grace: from zero.
        swap_rules(&m, all, Instant::now());
        cached_and_masked(&m, "default/old", &["cards"]);
        assert!(
            m.encode_prometheus()
                .contains(r#"modelgate_cache_tokens_saved_total{route="default/old"} 7"#)
        );
    }

    #[test]
    fn a_rule_back_within_the_grace_keeps_its_count_and_one_in_use_outlives_it() {
        let m = Metrics::new();
        cached_and_masked(&m, "default/r", &["emails"]);
        swap_rules(&m, &[("default/r", &["emails"])], Instant::now());
        swap_rules(&m, &[("default/r", &[])], Instant::now());
        swap_rules(&m, &[("default/r", &["emails"])], Instant::now());
        m.sweep(Instant::now() + 2 * SERIES_GRACE);
        cached_and_masked(&m, "default/r", &["emails"]);
        let count = r#"modelgate_masking_total{route="default/r",rule="emails",action="redact",direction="prompt"}"#;
        assert!(m.encode_prometheus().contains(&format!("{count} 2")));

        // A compiled rule (or a cache policy) of a snapshot still alive holds its handles.
        let (rule, route) = (m.masking_rule("default/r", "emails"), m.route("default/r"));
        swap_rules(&m, &[], Instant::now());
        m.sweep(Instant::now() + SERIES_GRACE);
        assert_eq!(samples(&m, "default/r").len(), 6);
        drop((rule, route));
        m.sweep(Instant::now() + SERIES_GRACE);
        assert_eq!(samples(&m, "default/r"), Vec::<String>::new());
    }

    #[test]
    fn a_shadowed_routes_calls_are_recorded_side_by_side_and_leave_with_their_backend() {
        use crate::canonical::Usage;
        let m = Metrics::new();
        let used = Usage {
            input: Some(10),
            output: Some(5),
            cache_read: Some(2),
            ..Usage::default()
        };
        let ms = Duration::from_millis;
        m.backend("default/r", "b")
            .compare(false, CallOutcome::Ok, ms(200), &used, 0.25);
        let next = m.backend("default/r", "next");
        next.compare(true, CallOutcome::Ok, ms(300), &used, 0.5);
        next.compare(true, CallOutcome::Timeout, ms(1000), &Usage::default(), 0.0);
        next.shadow_skipped(SkipReason::MaxInFlight).inc();
        next.shadow_in_flight().inc();
        drop(next);
        let text = m.encode_prometheus();
        for line in [
            r#"modelgate_backend_requests_total{route="default/r",backend="b",shadow="false",outcome="ok"} 1"#,
            r#"modelgate_backend_requests_total{route="default/r",backend="next",shadow="true",outcome="ok"} 1"#,
            r#"modelgate_backend_requests_total{route="default/r",backend="next",shadow="true",outcome="timeout"} 1"#,
            r#"modelgate_backend_tokens_total{route="default/r",backend="b",shadow="false",kind="cache_read"} 2"#,
            r#"modelgate_backend_tokens_total{route="default/r",backend="next",shadow="true",kind="output"} 5"#,
            r#"modelgate_backend_cost_usd_total{route="default/r",backend="next",shadow="true"} 0.5"#,
            r#"modelgate_backend_request_duration_seconds_count{route="default/r",backend="next",shadow="true"} 2"#,
            r#"modelgate_shadow_skipped_total{route="default/r",backend="next",reason="max_in_flight"} 1"#,
            r#"modelgate_shadow_in_flight{route="default/r",backend="next"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        // Reasoning was not reported: no series for it.
        assert!(!text.contains(r#"kind="reasoning""#), "{text}");
        // The route goes: its backends' side-by-side series go after the grace.
        swap(&m, &[], &[]);
        m.sweep(Instant::now() + SERIES_GRACE);
        assert_eq!(samples(&m, "default/r"), Vec::<String>::new());
    }

    #[test]
    fn a_series_in_use_outlives_the_grace() {
        let m = Metrics::new();
        request(&m, "default/k", "default/r");
        swap(&m, &["default/k"], &["default/r"]);
        swap(&m, &[], &[]);
        // A request that started on the old snapshot is still recording.
        let (key, backend) = (m.key("default/k"), m.backend("default/r", "b"));
        let later = Instant::now() + SERIES_GRACE;
        m.sweep(later);
        assert!(!samples(&m, "default/k").is_empty());
        // The route's own series are unused and go; the backend's and the key's stay.
        let left = samples(&m, "default/r");
        let has = |metric: &str| left.iter().any(|l| l.starts_with(metric));
        assert!(!has("modelgate_request_duration_seconds") && !has("modelgate_fallbacks"));
        assert!(has("modelgate_time_to_first_token_seconds") && has("modelgate_requests"));
        drop((key, backend));
        m.sweep(later);
        assert!(samples(&m, "default/k").is_empty());
        assert!(samples(&m, "default/r").is_empty());
    }

    #[test]
    fn a_name_back_within_the_grace_keeps_its_series() {
        let m = Metrics::new();
        request(&m, "default/k", "default/r");
        swap(&m, &["default/k"], &["default/r"]);
        swap(&m, &[], &[]);
        swap(&m, &["default/k"], &["default/r"]);
        m.sweep(Instant::now() + 2 * SERIES_GRACE);
        request(&m, "default/k", "default/r");
        let text = m.encode_prometheus();
        assert!(
            text.contains("modelgate_requests_total{route=\"default/r\",backend=\"b\",key=\"default/k\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "modelgate_fallbacks_total{route=\"default/r\",reason=\"server_error\"} 2"
            )
        );

        // Back only after the grace: new series, from zero.
        swap(&m, &[], &[]);
        m.sweep(Instant::now() + SERIES_GRACE);
        swap(&m, &["default/k"], &["default/r"]);
        request(&m, "default/k", "default/r");
        assert!(m.encode_prometheus().contains("modelgate_requests_total{route=\"default/r\",backend=\"b\",key=\"default/k\",status=\"200\"} 1"));
    }
}
