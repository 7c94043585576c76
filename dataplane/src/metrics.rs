//! The proxy's Prometheus metrics.
//!
//! `prometheus-client` (the official Rust client) gives typed label sets, so a label can only
//! ever be a route, backend or key name from the snapshot, a status code or a fixed word —
//! never request data, never a secret. Exposed in the Prometheus text format on the admin port.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TokenKind {
    Input,
    Output,
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

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    RateLimited,
    ServerError,
    Stream,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub route: String,
    pub backend: String,
    pub kind: UpstreamErrorKind,
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

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub ttft: Family<BackendLabels, Histogram>,
    pub overhead: Histogram,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub rejected: Family<LimitLabels, Counter>,
    pub retries: Family<BackendLabels, Counter>,
    pub fallbacks: Family<RouteLabels, Counter>,
    pub ejections: Family<BackendLabels, Counter>,
    pub in_flight: Gauge,
    pub connections_refused: Counter,
    pub snapshot_info: Family<VersionLabels, Gauge>,
    pub reloads: Family<ResultLabels, Counter>,
    pub last_reload_success: Gauge,
    pub last_reload_timestamp: Gauge,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ]
    .into_iter()
}

fn overhead_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
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
        let mut registry = Registry::with_prefix("modelgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, backend, key and response status",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "request_duration_seconds",
            "Time from request start to the last response byte",
            request_duration.clone(),
        );
        let ttft =
            Family::<BackendLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "time_to_first_token_seconds",
            "Time from request start to the first streamed token sent to the client",
            ttft.clone(),
        );
        let overhead = Histogram::new(overhead_buckets());
        registry.register(
            "gateway_overhead_seconds",
            "Time spent in the proxy itself, excluding waiting for upstreams",
            overhead.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("tokens", "Tokens metered from upstream usage", tokens.clone());
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
            "Requests refused by a key's rate limit, concurrency limit or budget",
            rejected.clone(),
        );
        let retries = Family::<BackendLabels, Counter>::default();
        registry.register("retries", "Attempts retried after a failure", retries.clone());
        let fallbacks = Family::<RouteLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Requests that fell through to a lower priority tier",
            fallbacks.clone(),
        );
        let ejections = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_ejections",
            "Backends ejected by passive outlier detection",
            ejections.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("in_flight_requests", "Requests being served", in_flight.clone());
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
        Self {
            registry,
            requests,
            request_duration,
            ttft,
            overhead,
            tokens,
            cost,
            upstream_errors,
            rejected,
            retries,
            fallbacks,
            ejections,
            in_flight,
            connections_refused,
            snapshot_info,
            reloads,
            last_reload_success,
            last_reload_timestamp,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
                .get_or_create(&VersionLabels { version: v.to_owned() })
                .set(1);
        }
    }
}
