//! Metering: the last phase of every request, which always runs.
//!
//! A [`Meter`] is created when a request arrives and records everything when it is dropped:
//! after a normal response, after an error, when a stream ends or breaks, and when the
//! client disconnects (hyper drops the handler future or the response body, and with it the
//! meter). Recording settles the admission ticket with the real usage, updates the metrics
//! and writes one access-log line (`accesslog`). Nothing secret is in either.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::Ticket;
use crate::busy::BusyClock;
use crate::canonical::{StopReason, Usage};
use crate::keys::Key;
use crate::metrics::{CallOutcome, Metrics, TokenKind, UpstreamErrorKind};
use crate::routes::{Backend, Route};
use crate::stream::StreamObserver;

/// Output tokens estimated from streamed text when an upstream reports no usage: about four
/// characters a token, the usual rule of thumb for English with BPE tokenizers.
const CHARS_PER_TOKEN: u64 = 4;

/// Output tokens charged for `chars` characters of streamed text when no usage was reported.
pub fn estimated_output_tokens(chars: u64) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN)
}

/// Where the charged usage came from; logged as `"usage"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream's own numbers.
    Reported,
    /// The prompt estimate and the streamed text: the upstream said nothing.
    Estimated,
    /// The upstream's input figures, and the streamed text for the output it never reported
    /// (a stream cut after Anthropic's `message_start`).
    Partial,
    /// Nothing charged: no model was reached.
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reported => "reported",
            Self::Estimated => "estimated",
            Self::Partial => "partial",
            Self::None => "none",
        }
    }
}

pub struct Meter {
    metrics: Arc<Metrics>,
    start: Instant,
    pub request_id: String,
    pub endpoint: &'static str,
    pub model: Option<String>,
    pub stream: bool,
    pub route: Option<Arc<Route>>,
    pub key: Option<Arc<Key>>,
    pub backend: Option<Arc<Backend>>,
    pub ticket: Option<Ticket>,
    /// Response status sent to the client; 0 until one is (then the client left: 499).
    pub status: u16,
    pub error: Option<&'static str>,
    pub attempts: u32,
    /// The busy clocks of the client's connection and of the upstream connection that
    /// answered (see `busy`), and what was taken from them so far.
    connection: Option<BusyClock>,
    upstream: Option<BusyClock>,
    busy: Duration,
    /// The busy time when the response headers were ready (`x-modelgate-overhead-us`).
    overhead: Option<Duration>,
    ttft: Option<Duration>,
    usage: Option<Usage>,
    pub prompt_estimate: u64,
    /// Request fields a translation dropped (`x-modelgate-ignored-params`).
    pub ignored_params: Vec<&'static str>,
    /// Characters of generated text streamed so far (after JSON unescaping).
    output_chars: u64,
    finish_reason: Option<&'static str>,
    stream_outcome: Option<&'static str>,
    upstream_stream_failed: bool,
    /// The request's trace span (tracing on): ended with the rest when the meter drops.
    pub span: Option<crate::traces::RequestSpan>,
    /// What the route's response cache did (`x-modelgate-cache`); None: the route has none.
    pub cache: Option<crate::cache::Outcome>,
    /// A miss to store once its answer is complete: told the verdict when the meter drops.
    pub cache_fill: Option<crate::cache::Fill>,
}

impl Meter {
    pub fn new(metrics: Arc<Metrics>, request_id: String) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            start: Instant::now(),
            request_id,
            endpoint: "",
            model: None,
            stream: false,
            route: None,
            key: None,
            backend: None,
            ticket: None,
            status: 0,
            error: None,
            attempts: 0,
            connection: None,
            upstream: None,
            busy: Duration::ZERO,
            overhead: None,
            ttft: None,
            usage: None,
            prompt_estimate: 0,
            ignored_params: Vec::new(),
            output_chars: 0,
            finish_reason: None,
            stream_outcome: None,
            upstream_stream_failed: false,
            span: None,
            cache: None,
            cache_fill: None,
        }
    }

    /// The answer came from the response cache: whole, with no upstream call.
    pub fn served_from_cache(&mut self) {
        self.cache = Some(crate::cache::Outcome::Hit);
        if self.stream {
            self.stream_outcome = Some("complete");
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The request starts on the client connection `clock`: what the connection spent since
    /// its previous request took its share (reading this request, mostly) is charged now,
    /// the rest as the request goes on.
    pub fn charge_connection(&mut self, clock: BusyClock) {
        self.busy += clock.take();
        self.connection = Some(clock);
    }

    /// An attempt used the upstream connection `clock`: its reads and writes so far are
    /// charged now; the last one's (the answer that goes on) as the request goes on.
    pub fn charge_upstream(&mut self, clock: BusyClock) {
        self.busy += clock.take();
        self.upstream = Some(clock);
    }

    /// The request's busy time so far.
    fn busy_now(&mut self) -> Duration {
        for clock in [&self.connection, &self.upstream].into_iter().flatten() {
            self.busy += clock.take();
        }
        self.busy
    }

    /// The response headers are ready: fix the gateway's own time so far.
    pub fn response_ready(&mut self, status: u16) -> Duration {
        self.status = status;
        let overhead = self.busy_now();
        self.overhead = Some(overhead);
        overhead
    }

    /// The gateway's own time when the response headers were ready.
    pub fn overhead(&self) -> Option<Duration> {
        self.overhead
    }

    /// The upstream's whole usage report: replaces any earlier one.
    pub fn set_usage(&mut self, u: Usage) {
        self.usage = Some(u);
    }

    /// A partial usage report (a translated stream's `message_start`, then its
    /// `message_delta`): each field it carries replaces the earlier value.
    pub fn merge_usage(&mut self, u: Usage) {
        match &mut self.usage {
            Some(have) => have.merge(u),
            None => self.usage = Some(u),
        }
    }

    /// How a translated answer stopped, in OpenAI's words (what the log says).
    pub fn stop_reason(&mut self, stop: StopReason) {
        StreamObserver::finish_reason(self, stop.openai());
    }

    /// Generated text streamed to the client: counts towards an estimate, and the first of
    /// it fixes the time to first token.
    pub fn output_text(&mut self, chars: u64) {
        if chars == 0 {
            return;
        }
        self.output_chars = self.output_chars.saturating_add(chars);
        if self.ttft.is_none() {
            self.ttft = Some(self.start.elapsed());
        }
    }

    /// The upstream's own stream carried an error event (e.g. Anthropic's `overloaded_error`
    /// after `message_start`): the stream ends as broken, whatever follows.
    pub fn upstream_stream_error(&mut self) {
        self.upstream_stream_failed = true;
    }

    /// The stream ended, cleanly or with an upstream error.
    pub fn finish_stream(mut self, error: Option<UpstreamErrorKind>) {
        let error = error.or(self
            .upstream_stream_failed
            .then_some(UpstreamErrorKind::Stream));
        self.stream_outcome = Some(if error.is_some() {
            "upstream_error"
        } else {
            "complete"
        });
        if let Some(kind) = error {
            self.error = Some("upstream_stream_broken");
            if let Some(b) = &self.backend {
                b.series(&self.metrics).upstream_error(kind).inc();
            }
        }
    }

    /// How the call of the backend that answered ended, for the side-by-side series of a
    /// route with a shadow; None when the client left first (no verdict on the backend) or
    /// no model work was asked (token counting).
    fn compared_outcome(&self) -> Option<CallOutcome> {
        let client_left =
            self.status == 0 || (self.stream && self.status < 300 && self.stream_outcome.is_none());
        if client_left || self.endpoint == "count_tokens" {
            return None;
        }
        Some(match (self.status, self.error) {
            (_, Some("upstream_timeout")) => CallOutcome::Timeout,
            (_, _) if self.stream_outcome == Some("upstream_error") => CallOutcome::Error,
            (s, _) if s < 400 => CallOutcome::Ok,
            (_, Some("upstream_rate_limited")) => CallOutcome::Error,
            (400..=499, _) => CallOutcome::ClientError,
            _ => CallOutcome::Error,
        })
    }

    /// Usage to charge: what the upstream reported, else an estimate if a model was reached.
    /// The estimate settles the admission ticket like reported usage, so limits and budgets
    /// hold against upstreams that report nothing.
    fn charged(&self) -> (Usage, UsageSource) {
        match self.usage {
            Some(u) if u.output.is_none() && self.backend.is_some() => (
                Usage {
                    output: Some(estimated_output_tokens(self.output_chars)),
                    ..u
                },
                UsageSource::Partial,
            ),
            Some(u) => (u, UsageSource::Reported),
            None if self.backend.is_some()
                && (self.status == 0 || self.status < 300 || self.stream) =>
            {
                let u = Usage {
                    input: Some(self.prompt_estimate),
                    output: Some(estimated_output_tokens(self.output_chars)),
                    ..Usage::default()
                };
                (u, UsageSource::Estimated)
            }
            None => (Usage::default(), UsageSource::None),
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // Streams included: their reading and writing after the headers counts too.
        let busy = self.busy_now();
        let m = &self.metrics;
        m.in_flight.dec();
        let status = if self.status == 0 { 499 } else { self.status };
        let outcome = match (self.status, self.stream_outcome) {
            (0, _) => "client_closed",
            (_, Some(o)) => o,
            (s, None) if self.stream && s < 300 => "client_closed",
            (s, None) if s >= 400 => "error",
            _ => "complete",
        };
        let (usage, source) = self.charged();
        let cost = self
            .backend
            .as_ref()
            .map(|b| b.pricing.cost_of(&usage))
            .unwrap_or(0.0);
        if let Some(t) = self.ticket.take() {
            t.settle(usage.processed(), cost);
        }
        if let Some(fill) = self.cache_fill.take() {
            // Only a whole 200 answer is kept: a stream must have ended cleanly, with its
            // finish reason, never cut off.
            let complete = self.status == 200
                && self.error.is_none()
                && (!self.stream
                    || (self.stream_outcome == Some("complete")
                        && !self.upstream_stream_failed
                        && self.finish_reason.is_some()));
            fill.verdict(complete.then_some((usage, cost)));
        }
        let route = self.route.as_ref().map(|r| r.id.as_str()).unwrap_or("");
        let backend = self.backend.as_ref().map(|b| b.name.as_str()).unwrap_or("");
        let key = self.key.as_ref().map(|k| &*k.id).unwrap_or("");
        let duration = self.start.elapsed();
        // Handles resolved once per key, route and backend: no label set is built here.
        let key_series = m.key(key);
        let route_series = self.route.as_ref().map(|r| m.route(&r.id));
        let backend_series = self.backend.as_ref().map(|b| b.series(m));
        let traffic = key_series.traffic(route, backend);
        traffic.requests(status).inc();
        if let Some(r) = &route_series {
            r.duration().observe(duration.as_secs_f64());
        }
        if self.overhead.is_some() {
            m.overhead.observe(busy.as_secs_f64());
        }
        if let (Some(t), Some(b)) = (self.ttft, backend_series) {
            b.ttft().observe(t.as_secs_f64());
        }
        if matches!(source, UsageSource::Estimated | UsageSource::Partial)
            && let Some(b) = backend_series
        {
            b.usage_estimated().inc();
        }
        if usage.processed() > 0 {
            // Cache and reasoning series only where a backend reports them, so a
            // deployment without caching keeps its two series per key.
            let n = |v: Option<u64>| v.unwrap_or(0);
            traffic.tokens(TokenKind::Input).inc_by(n(usage.input));
            traffic.tokens(TokenKind::Output).inc_by(n(usage.output));
            for (kind, v) in [
                (TokenKind::CacheRead, usage.cache_read),
                (TokenKind::CacheWrite, usage.cache_write),
                (TokenKind::Reasoning, usage.reasoning),
            ] {
                if let Some(v) = v {
                    traffic.tokens(kind).inc_by(v);
                }
            }
        }
        if cost > 0.0 {
            traffic.cost().inc_by(cost);
        }
        let trace_id = self.span.as_ref().and_then(|s| s.trace_id());
        if let Some(span) = self.span.take() {
            span.finish(&crate::traces::Finished {
                request_id: &self.request_id,
                endpoint: self.endpoint,
                model: self.model.as_deref(),
                route,
                backend: self.backend.as_deref(),
                key,
                status,
                outcome,
                error: self.error,
                usage: (source != UsageSource::None).then_some(usage),
                finish_reason: self.finish_reason,
                stream: self.stream,
                attempts: self.attempts,
                cost_usd: cost,
            });
        }
        if let (Some(r), Some(b), Some(series)) = (&self.route, &self.backend, backend_series) {
            if r.strategy == crate::routes::Strategy::LowestCost && source == UsageSource::Reported
            {
                b.state.record_prompt_mix(&usage);
            }
            if r.shadow.is_some()
                && let Some(outcome) = self.compared_outcome()
            {
                series.compare(false, outcome, duration, &usage, cost);
            }
        }
        crate::accesslog::record(&crate::accesslog::Entry {
            trace_id: trace_id.as_deref(),
            request_id: &self.request_id,
            endpoint: self.endpoint,
            model: self.model.as_deref().unwrap_or(""),
            route,
            backend,
            key,
            status,
            outcome,
            stream: self.stream,
            attempts: self.attempts,
            duration_ms: duration.as_secs_f64() * 1e3,
            ttft_ms: self.ttft.map(|t| t.as_secs_f64() * 1e3),
            overhead_us: self.overhead.map(|_| busy.as_micros() as u64),
            input_tokens: usage.input.unwrap_or(0),
            output_tokens: usage.output.unwrap_or(0),
            cache_read_tokens: usage.cache_read,
            cache_write_tokens: usage.cache_write,
            reasoning_tokens: usage.reasoning,
            usage: source.as_str(),
            finish_reason: self.finish_reason,
            cost_usd: cost,
            error: self.error,
            cache: self.cache.map(crate::cache::Outcome::as_str),
        });
    }
}

impl StreamObserver for Meter {
    fn usage(&mut self, usage: Usage) {
        self.set_usage(usage);
    }

    fn output_text(&mut self, chars: u64) {
        Meter::output_text(self, chars);
    }

    fn finish_reason(&mut self, reason: &str) {
        // A fixed word, never upstream text, reaches the log.
        self.finish_reason = Some(match reason {
            "stop" => "stop",
            "length" => "length",
            "tool_calls" => "tool_calls",
            "content_filter" => "content_filter",
            "function_call" => "function_call",
            _ => "other",
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Limits;
    use crate::admission::{Estimate, admit};
    use crate::keys::{KeyHash, KeyStore};
    use crate::metrics::SERIES_GRACE;
    use crate::providers::mock::MockSettings;
    use crate::routes::{
        BackendState, OutlierPolicy, Pricing, Provider, RetryPolicy, RouteTable, Tier,
    };
    use crate::snapshot::{Live, Snapshot, StateRegistry};

    fn key() -> Key {
        key_named("default/k")
    }

    fn key_named(id: &str) -> Key {
        Key {
            id: id.into(),
            namespace: "default".into(),
            models: Box::default(),
            limits: Limits {
                tokens_per_minute: Some(1000),
                ..Default::default()
            },
            budget: None,
            expires_at: None,
            disabled: false,
            exhausted: false,
            max_cost_per_request: None,
            state: std::sync::OnceLock::new(),
        }
    }

    fn backend() -> Arc<Backend> {
        Arc::new(Backend::new(
            "default/r",
            "b",
            Provider::Mock(MockSettings::default()),
            None,
            1,
            None,
            Pricing::default(),
            Arc::new(BackendState::default()),
        ))
    }

    /// A streamed request that reached `backend`, holding a ticket of `key`.
    fn streamed(metrics: &Arc<Metrics>, key: &Key, registry: &StateRegistry) -> Meter {
        let mut m = Meter::new(metrics.clone(), "r1".into());
        m.stream = true;
        m.backend = Some(backend());
        m.prompt_estimate = 3;
        m.ticket = Some(
            admit(
                key,
                registry,
                Estimate {
                    tokens: 500,
                    usd: 0.0,
                },
                crate::admission::unix_now(),
            )
            .unwrap(),
        );
        m.response_ready(200);
        m
    }

    #[test]
    fn without_usage_the_streamed_text_is_charged_and_marked_estimated() {
        let metrics = Arc::new(Metrics::new());
        let (key, registry) = (key(), StateRegistry::default());
        let mut m = streamed(&metrics, &key, &registry);
        // Many chunks of little text are few tokens; the count of chunks does not matter.
        for _ in 0..10 {
            m.output_text(1);
        }
        m.output_text(0);
        StreamObserver::output_text(&mut m, 3);
        StreamObserver::finish_reason(&mut m, "stop");
        let (u, source) = m.charged();
        assert_eq!(
            (u.input, u.output, source),
            (Some(3), Some(4), UsageSource::Estimated)
        );
        m.finish_stream(None);
        // The estimate settled the ticket: it counts against the key's limits and budget.
        let used = key.state(&registry).take_unreported().unwrap();
        assert_eq!(used.tokens, 3 + 4);
        let text = metrics.encode_prometheus();
        assert!(
            // The backend's series carry its own route.
            text.contains("modelgate_usage_estimated_total{route=\"default/r\",backend=\"b\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn reported_usage_wins_over_the_estimate() {
        let metrics = Arc::new(Metrics::new());
        let (key, registry) = (key(), StateRegistry::default());
        let mut m = streamed(&metrics, &key, &registry);
        m.output_text(4000);
        StreamObserver::usage(
            &mut m,
            Usage {
                input: Some(11),
                output: Some(2),
                ..Usage::default()
            },
        );
        let (u, source) = m.charged();
        assert_eq!(
            (u.input, u.output, source),
            (Some(11), Some(2), UsageSource::Reported)
        );
        drop(m);
        assert_eq!(key.state(&registry).take_unreported().unwrap().tokens, 13);
        assert!(
            !metrics
                .encode_prometheus()
                .contains("modelgate_usage_estimated_total{")
        );
    }

    #[test]
    fn a_stream_cut_after_its_input_figures_charges_them_and_estimates_the_output() {
        let metrics = Arc::new(Metrics::new());
        let (key, registry) = (key(), StateRegistry::default());
        let mut m = streamed(&metrics, &key, &registry);
        // Anthropic's message_start: the input side only; then text, then the cut.
        m.merge_usage(Usage {
            input: Some(30),
            cache_read: Some(5),
            ..Usage::default()
        });
        m.output_text(40);
        let (u, source) = m.charged();
        assert_eq!(source, UsageSource::Partial);
        assert_eq!(
            (u.input, u.cache_read, u.output),
            (Some(30), Some(5), Some(10))
        );
        m.finish_stream(Some(UpstreamErrorKind::Stream));
        assert_eq!(key.state(&registry).take_unreported().unwrap().tokens, 45);
    }

    /// Route `id` answering to `model`, with one priced backend `b`: new objects every call,
    /// as every compile makes them.
    fn routed(id: &str, model: &str) -> Arc<Route> {
        let backend = Backend::new(
            id,
            "b",
            Provider::Mock(MockSettings::default()),
            None,
            1,
            None,
            Pricing::flat(1.0, 2.0),
            Arc::default(),
        );
        Arc::new(Route {
            id: id.into(),
            namespace: "default".into(),
            model: model.into(),
            aliases: vec![],
            strategy: Default::default(),
            timeout: None,
            retry: RetryPolicy::default(),
            outlier: OutlierPolicy::default(),
            max_output_tokens: None,
            stream_idle_timeout: None,
            stream_timeout: None,
            max_cost_per_request: None,
            shadow: None,
            cache: None,
            masking: None,
            tiers: vec![Tier {
                priority: 0,
                backends: vec![Arc::new(backend)],
            }],
        })
    }

    fn snapshot(routes: Vec<Arc<Route>>, keys: &[&Arc<Key>]) -> Snapshot {
        let mut store = KeyStore::with_capacity(keys.len());
        for k in keys {
            assert!(store.insert(KeyHash::of(k.id.as_bytes()), Arc::clone(k)));
        }
        Snapshot {
            version: String::new(),
            routes: RouteTable::new(routes),
            keys: store,
            routes_summary: String::new(),
        }
    }

    /// One answered request of `key` for `model` on the snapshot in force.
    fn send(live: &Live, metrics: &Arc<Metrics>, key: &Arc<Key>, model: &str) {
        let route = live
            .load()
            .unwrap()
            .routes
            .get("default", model)
            .unwrap()
            .clone();
        let mut m = Meter::new(metrics.clone(), "r".into());
        m.key = Some(key.clone());
        m.backend = Some(route.tiers[0].backends[0].clone());
        m.route = Some(route);
        m.output_text(8);
        m.set_usage(Usage {
            input: Some(5),
            output: Some(2),
            ..Usage::default()
        });
        m.response_ready(200);
    }

    fn requests_of(metrics: &Metrics, key: &str, route: &str) -> Option<u64> {
        let series = format!(
            "modelgate_requests_total{{route=\"{route}\",backend=\"b\",key=\"{key}\",status=\"200\"}} "
        );
        let text = metrics.encode_prometheus();
        let line = text.lines().find_map(|l| l.strip_prefix(&series))?;
        Some(line.parse().unwrap())
    }

    #[test]
    fn the_same_request_twice_builds_no_label_set() {
        let metrics = Arc::new(Metrics::new());
        let live = Live::metered(metrics.clone());
        let key = Arc::new(key());
        live.store(snapshot(vec![routed("default/r", "m")], &[&key]));
        send(&live, &metrics, &key, "m");
        let resolved = metrics.label_sets_resolved();
        // requests, input and output tokens, cost, duration, time to first token.
        assert_eq!(resolved, 6);
        send(&live, &metrics, &key, "m");
        assert_eq!(metrics.label_sets_resolved(), resolved);
        // A reload makes new route and backend objects; their names keep the handles.
        drop(live.store(snapshot(vec![routed("default/r", "m")], &[&key])));
        send(&live, &metrics, &key, "m");
        assert_eq!(metrics.label_sets_resolved(), resolved);
        assert_eq!(requests_of(&metrics, "default/k", "default/r"), Some(3));
        assert!(metrics.encode_prometheus().contains(
            "modelgate_tokens_total{route=\"default/r\",backend=\"b\",key=\"default/k\",kind=\"input\"} 15"
        ));
    }

    #[test]
    fn series_of_a_removed_key_and_route_leave_after_the_grace() {
        let metrics = Arc::new(Metrics::new());
        let live = Live::metered(metrics.clone());
        let (gone, kept) = (
            Arc::new(key_named("default/gone")),
            Arc::new(key_named("default/kept")),
        );
        let both = vec![routed("default/old", "old"), routed("default/r", "m")];
        drop(live.store(snapshot(both, &[&gone, &kept])));
        send(&live, &metrics, &gone, "old");
        send(&live, &metrics, &kept, "m");
        let mentions = |name: &str| {
            let quoted = format!("\"{name}\"");
            metrics
                .encode_prometheus()
                .lines()
                .any(|l| !l.starts_with('#') && l.contains(&quoted))
        };
        assert!(mentions("default/gone") && mentions("default/old"));

        let t0 = Instant::now();
        drop(live.store(snapshot(vec![routed("default/r", "m")], &[&kept])));
        let t1 = Instant::now();
        drop(gone);
        metrics.sweep(t0 + SERIES_GRACE - Duration::from_millis(1));
        assert!(mentions("default/gone") && mentions("default/old"));
        assert_eq!(
            requests_of(&metrics, "default/gone", "default/old"),
            Some(1)
        );

        metrics.sweep(t1 + SERIES_GRACE);
        assert!(!mentions("default/gone"));
        assert!(!mentions("default/old"));
        // What the snapshot kept stays, idle or not.
        assert_eq!(requests_of(&metrics, "default/kept", "default/r"), Some(1));
        assert!(metrics.encode_prometheus().contains(
            "modelgate_time_to_first_token_seconds_count{route=\"default/r\",backend=\"b\"} 1"
        ));
    }

    #[test]
    fn a_key_that_returns_keeps_its_counts() {
        let metrics = Arc::new(Metrics::new());
        let live = Live::metered(metrics.clone());
        let key = Arc::new(key());
        drop(live.store(snapshot(vec![routed("default/r", "m")], &[&key])));
        send(&live, &metrics, &key, "m");
        drop(live.store(snapshot(vec![routed("default/r", "m")], &[])));
        drop(key);
        // Back within the grace, as a new object (its spec changed, say).
        let key = Arc::new(key_named("default/k"));
        drop(live.store(snapshot(vec![routed("default/r", "m")], &[&key])));
        metrics.sweep(Instant::now() + 2 * SERIES_GRACE);
        assert_eq!(requests_of(&metrics, "default/k", "default/r"), Some(1));
        send(&live, &metrics, &key, "m");
        assert_eq!(requests_of(&metrics, "default/k", "default/r"), Some(2));
    }

    #[test]
    fn the_estimate_rounds_up() {
        assert_eq!(estimated_output_tokens(0), 0);
        assert_eq!(estimated_output_tokens(1), 1);
        assert_eq!(estimated_output_tokens(4), 1);
        assert_eq!(estimated_output_tokens(5), 2);
        assert_eq!(estimated_output_tokens(u64::MAX), u64::MAX / 4 + 1);
    }
}
