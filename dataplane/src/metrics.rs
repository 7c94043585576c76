//! The proxy's Prometheus metrics.
//!
//! `prometheus-client` (the official Rust client) gives typed label sets, so a label can only
//! ever be a route, backend or key name from the snapshot, a status code or a fixed word —
//! never request data, never a secret. Exposed in the Prometheus text format on the admin port.

use std::sync::atomic::AtomicU64;

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
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

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TokenKind {
    Input,
    Output,
}

impl EncodeLabelValue for TokenKind {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(match self {
            Self::Input => "input",
            Self::Output => "output",
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
    RateLimited,
    ServerError,
    Stream,
    /// The upstream refused the gateway's own credentials (401/403).
    CredentialsRefused,
}

impl EncodeLabelValue for UpstreamErrorKind {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::ServerError => "server_error",
            Self::Stream => "stream_broken",
            Self::CredentialsRefused => "credentials_refused",
        })
    }
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
    pub usage_estimated: Family<BackendLabels, Counter>,
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
    pub operator_stream_failures: Counter,
    pub access_log_dropped: Counter,
}

/// OpenMetrics names a counter family without `_total` in `# HELP`/`# TYPE`; the classic
/// format names it as its samples are named. `# UNIT` and `# EOF` do not exist there.
pub fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + counters.len() * 16);
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
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
            "Time spent in the proxy itself, excluding waiting for upstreams",
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
            "Requests refused by a key's rate limit, concurrency limit or budget",
            rejected.clone(),
        );
        let retries = Family::<BackendLabels, Counter>::default();
        registry.register(
            "retries",
            "Attempts retried after a failure",
            retries.clone(),
        );
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
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the log reader could not keep up",
            access_log_dropped.clone(),
        );
        let operator_stream_failures = Counter::default();
        registry.register(
            "operator_stream_failures",
            "Config streams to the operator that failed or were refused (TLS, token, network)",
            operator_stream_failures.clone(),
        );
        Self {
            registry,
            operator_stream_failures,
            access_log_dropped,
            requests,
            request_duration,
            ttft,
            overhead,
            tokens,
            usage_estimated,
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

    /// OpenMetrics text, for scrapers that ask for it.
    pub fn encode_openmetrics(&self) -> String {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_format_names_counters_like_their_samples() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "default/r".into(),
                backend: "b".into(),
                key: "default/k".into(),
                status: 200,
            })
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
}
