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
use crate::keys::Key;
use crate::metrics::{
    BackendLabels, CostLabels, Metrics, RequestLabels, RouteLabels, TokenKind, TokenLabels,
    UpstreamErrorKind,
};
use crate::routes::{Backend, Route};
use crate::stream::UsageWire;

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
    /// Time spent waiting on upstreams (and backoffs), excluded from the overhead.
    pub upstream_time: Duration,
    overhead: Option<Duration>,
    ttft: Option<Duration>,
    usage: Option<UsageWire>,
    pub prompt_estimate: u64,
    output_chunks: u64,
    stream_outcome: Option<&'static str>,
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
            upstream_time: Duration::ZERO,
            overhead: None,
            ttft: None,
            usage: None,
            prompt_estimate: 0,
            output_chunks: 0,
            stream_outcome: None,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The response headers are ready: fix the gateway's own share of the time so far.
    pub fn response_ready(&mut self, status: u16) -> Duration {
        self.status = status;
        let overhead = self.start.elapsed().saturating_sub(self.upstream_time);
        self.overhead = Some(overhead);
        overhead
    }

    /// The gateway's own time, as fixed by `response_ready`.
    pub fn overhead(&self) -> Option<Duration> {
        self.overhead
    }

    pub fn set_usage(&mut self, u: UsageWire) {
        self.usage = Some(u);
    }

    pub fn saw_output_chunk(&mut self) {
        self.output_chunks += 1;
        if self.ttft.is_none() {
            self.ttft = Some(self.start.elapsed());
        }
    }

    /// The stream ended, cleanly or with an upstream error.
    pub fn finish_stream(mut self, error: Option<UpstreamErrorKind>) {
        self.stream_outcome = Some(if error.is_some() {
            "upstream_error"
        } else {
            "complete"
        });
        if let Some(kind) = error {
            self.error = Some("upstream_stream_broken");
            if let (Some(r), Some(b)) = (&self.route, &self.backend) {
                self.metrics
                    .upstream_errors
                    .get_or_create(&crate::metrics::UpstreamErrorLabels {
                        route: r.id.clone(),
                        backend: b.name.clone(),
                        kind,
                    })
                    .inc();
            }
        }
    }

    /// Usage to charge: what the upstream reported, else an estimate if a model was reached.
    fn charged(&self) -> (u64, u64, bool) {
        match self.usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens, false),
            None if self.backend.is_some()
                && (self.status == 0 || self.status < 300 || self.stream) =>
            {
                (self.prompt_estimate, self.output_chunks, true)
            }
            None => (0, 0, false),
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
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
        let (input, output, estimated) = self.charged();
        let cost = self
            .backend
            .as_ref()
            .map(|b| b.pricing.cost(input, output))
            .unwrap_or(0.0);
        if let Some(t) = self.ticket.take() {
            t.settle(input + output, cost);
        }
        let route = self.route.as_ref().map(|r| r.id.as_str()).unwrap_or("");
        let backend = self.backend.as_ref().map(|b| b.name.as_str()).unwrap_or("");
        let key = self.key.as_ref().map(|k| &*k.id).unwrap_or("");
        let duration = self.start.elapsed();
        m.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                backend: backend.to_owned(),
                key: key.to_owned(),
                status,
            })
            .inc();
        if !route.is_empty() {
            m.request_duration
                .get_or_create(&RouteLabels {
                    route: route.to_owned(),
                })
                .observe(duration.as_secs_f64());
        }
        if let Some(o) = self.overhead {
            m.overhead.observe(o.as_secs_f64());
        }
        if let (Some(t), false) = (self.ttft, backend.is_empty()) {
            m.ttft
                .get_or_create(&BackendLabels {
                    route: route.to_owned(),
                    backend: backend.to_owned(),
                })
                .observe(t.as_secs_f64());
        }
        if input + output > 0 {
            for (kind, n) in [(TokenKind::Input, input), (TokenKind::Output, output)] {
                m.tokens
                    .get_or_create(&TokenLabels {
                        route: route.to_owned(),
                        backend: backend.to_owned(),
                        key: key.to_owned(),
                        kind,
                    })
                    .inc_by(n);
            }
        }
        if cost > 0.0 {
            m.cost
                .get_or_create(&CostLabels {
                    route: route.to_owned(),
                    backend: backend.to_owned(),
                    key: key.to_owned(),
                })
                .inc_by(cost);
        }
        crate::accesslog::record(&crate::accesslog::Entry {
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
            overhead_us: self.overhead.map(|o| o.as_micros() as u64),
            input_tokens: input,
            output_tokens: output,
            usage_estimated: estimated,
            cost_usd: cost,
            error: self.error,
        });
    }
}
