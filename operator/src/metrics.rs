//! The operator's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub compiles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub compile_seconds: Histogram,
    pub snapshot_bytes: Gauge,
    pub snapshots_published: Counter,
    pub connected_proxies: Gauge,
    pub push_to_ack_seconds: Histogram,
    pub status_writes: Family<KindLabels, Counter>,
    pub invalid_objects: Family<KindLabels, Gauge>,
    pub leader: Gauge,
    pub refused_proxies: Family<ReasonLabels, Counter>,
    pub rejected_reports: Family<ReasonLabels, Counter>,
    pub cached_secrets: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("modelgate_operator");
        let compiles = Counter::default();
        registry.register("reconciles", "Snapshot compilations", compiles.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("errors", "Errors by kind", errors.clone());
        let compile_seconds = Histogram::new([
            0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
        ]);
        registry.register(
            "compile_duration_seconds",
            "Time to compile the index into a snapshot",
            compile_seconds.clone(),
        );
        let snapshot_bytes = Gauge::default();
        registry.register(
            "snapshot_size_bytes",
            "Size of the published snapshot message",
            snapshot_bytes.clone(),
        );
        let snapshots_published = Counter::default();
        registry.register(
            "snapshots_published",
            "Snapshot versions published to proxies",
            snapshots_published.clone(),
        );
        let connected_proxies = Gauge::default();
        registry.register(
            "connected_proxies",
            "Proxies with an open config stream to this replica",
            connected_proxies.clone(),
        );
        let push_to_ack_seconds = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        registry.register(
            "push_to_ack_seconds",
            "Time from publishing a snapshot to a proxy acknowledging it",
            push_to_ack_seconds.clone(),
        );
        let status_writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "status_writes",
            "Status patches written",
            status_writes.clone(),
        );
        let invalid_objects = Family::<KindLabels, Gauge>::default();
        registry.register(
            "invalid_objects",
            "Objects with Accepted=False",
            invalid_objects.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 when this replica holds the Lease",
            leader.clone(),
        );
        let refused_proxies = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "refused_proxies",
            "Config API requests refused before any data was sent, by reason",
            refused_proxies.clone(),
        );
        let rejected_reports = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejected_reports",
            "Usage reports, acks and replica reports rejected, by reason",
            rejected_reports.clone(),
        );
        let cached_secrets = Gauge::default();
        registry.register(
            "cached_secrets",
            "Secrets held in memory (only those labelled modelgate.dev/credential=true)",
            cached_secrets.clone(),
        );
        Self {
            registry,
            refused_proxies,
            rejected_reports,
            cached_secrets,
            compiles,
            errors,
            compile_seconds,
            snapshot_bytes,
            snapshots_published,
            connected_proxies,
            push_to_ack_seconds,
            status_writes,
            invalid_objects,
            leader,
        }
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused_proxies
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn rejected(&self, reason: &'static str) {
        self.rejected_reports
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    /// Prometheus text format (what promtool and every scraper read).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        modelgate_wire::openmetrics_to_prometheus(&out)
    }
}
