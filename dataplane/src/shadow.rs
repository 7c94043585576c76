//! Shadow traffic: a sampled copy of a route's requests sent to a candidate backend (a new
//! model version), so the candidate can be judged on real traffic before it takes any.
//!
//! ```text
//!  request admitted ─► sampled (percent)? ─► a slot free (maxInFlight)? ─► spawn ─┐ else: skipped
//!                                                                                 │ detached task
//!   the same attempt a primary makes (translators, credentials, egress policy) ◄──┘
//!     ─► the whole answer read, or the stream drained; usage read in its dialect
//!     ─► backend_* series with shadow="true", beside the primary's (shadow="false")
//! ```
//!
//! The client never waits for a shadow call and never sees it: it runs on its own task with
//! its own copy of the body (a reference to the same bytes), after admission, holding no
//! key's ticket, slot or budget. A hanging candidate holds at most `maxInFlight` calls of its
//! route, each at most `timeout`; past that, requests go unmirrored and are counted as
//! skipped. A route without a shadow pays one branch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;

use crate::canonical::{Delta, Event, Usage};
use crate::metrics::{BackendSeries, CallOutcome, Metrics, SkipReason};
use crate::providers::{self, Failure, HttpClient, Outbound, anthropic::ClientHeaders};
use crate::request::{ApiRequest, Endpoint};
use crate::routes::{Backend, Demand};
use crate::stream::{SseScanner, StreamObserver, UpstreamBody, usage_of_body};
use crate::translate::{Dialect, StreamTranslator};

/// Largest whole shadow answer read; a larger one is an error (and its usage unknown).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// A route's shadow, as the request path runs it.
#[derive(Debug)]
pub struct Shadow {
    pub backend: Arc<Backend>,
    /// Share of admitted requests mirrored, 0 to 100.
    pub percent: f64,
    /// The longest one call may take, answer read.
    pub timeout: Duration,
    pub max_in_flight: u32,
    /// Calls under way: kept by route in the registry, so a reload does not lift the bound.
    pub state: Arc<ShadowState>,
}

/// The shadow calls of one route under way on this proxy.
#[derive(Debug, Default)]
pub struct ShadowState {
    in_flight: AtomicU32,
}

/// One call under way; its slot comes back when it drops, however the call ended.
struct Slot {
    state: Arc<ShadowState>,
    series: Arc<BackendSeries>,
}

impl Slot {
    fn take(shadow: &Shadow, series: &Arc<BackendSeries>) -> Option<Self> {
        shadow
            .state
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < shadow.max_in_flight).then_some(n + 1)
            })
            .ok()?;
        series.shadow_in_flight().inc();
        Some(Self {
            state: shadow.state.clone(),
            series: series.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.series.shadow_in_flight().dec();
    }
}

/// What a shadow call is made of, owned: it outlives the client's request.
pub struct Mirror {
    pub endpoint: Endpoint,
    /// The client's body (shared with the request, not copied).
    pub body: Bytes,
    /// Output tokens per choice that admission reserved for the primary: the most a
    /// translated request may ask for, as for the primary.
    pub output_reservation: u64,
    pub anthropic_headers: ClientHeaders,
    pub request_id: String,
}

/// Where the task finds what it needs of the gateway.
pub struct Context<'a> {
    pub client: &'a HttpClient,
    pub metrics: &'a Arc<Metrics>,
    /// The largest streamed event held while waiting for its end.
    pub max_event: usize,
}

impl Shadow {
    /// Whether this request is one of the sampled share.
    fn sampled(&self) -> bool {
        self.percent >= 100.0 || (self.percent > 0.0 && fastrand::f64() * 100.0 < self.percent)
    }

    /// Mirror a request if it is sampled and a slot is free: the call starts on a task of
    /// its own and this returns at once. `demand`: the request's prompt estimate and output
    /// reservation, held to the route's `guard` (maxCostPerRequest) at the shadow's prices.
    pub fn mirror(
        &self,
        gw: Context<'_>,
        demand: Demand,
        guard: Option<f64>,
        mirror: impl FnOnce() -> Mirror,
    ) {
        if !self.sampled() {
            return;
        }
        let series = self.backend.shared_series(gw.metrics);
        if guard.is_some_and(|max| {
            self.backend
                .pricing
                .worst_case(demand.prompt, demand.output)
                > max
        }) {
            series.shadow_skipped(SkipReason::CostGuard).inc();
            return;
        }
        let Some(slot) = Slot::take(self, &series) else {
            series.shadow_skipped(SkipReason::MaxInFlight).inc();
            return;
        };
        let call = Call {
            client: gw.client.clone(),
            backend: self.backend.clone(),
            mirror: mirror(),
            timeout: self.timeout,
            max_event: gw.max_event,
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let mut seen = Seen::default();
            let outcome = match tokio::time::timeout(call.timeout, call.run(&mut seen)).await {
                Ok(outcome) => outcome,
                Err(_) => CallOutcome::Timeout,
            };
            let usage = seen.charged();
            let cost = call.backend.pricing.cost_of(&usage);
            slot.series
                .compare(true, outcome, started.elapsed(), &usage, cost);
            tracing::debug!(
                request_id = %call.mirror.request_id,
                backend = %call.backend.name,
                ?outcome,
                "shadow call done"
            );
            drop(slot);
        });
    }
}

/// One shadow call, owned by its task.
struct Call {
    client: HttpClient,
    backend: Arc<Backend>,
    mirror: Mirror,
    timeout: Duration,
    max_event: usize,
}

/// What the shadow's answer said so far: kept outside the call, so a call cut by its
/// timeout still reports the usage it had seen.
#[derive(Default)]
struct Seen {
    usage: Option<Usage>,
    output_chars: u64,
    prompt_estimate: u64,
    /// A model was reached (an answer began).
    answered: bool,
    failed: bool,
}

impl Seen {
    /// The usage to record: what the candidate reported, else the gateway's estimate (the
    /// prompt and the text seen), as the primary is metered.
    fn charged(&self) -> Usage {
        match self.usage {
            Some(u) if u.output.is_some() => u,
            Some(u) => Usage {
                output: Some(crate::meter::estimated_output_tokens(self.output_chars)),
                ..u
            },
            None if self.answered => Usage {
                input: Some(self.prompt_estimate),
                output: Some(crate::meter::estimated_output_tokens(self.output_chars)),
                ..Usage::default()
            },
            None => Usage::default(),
        }
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::MessageStart { usage, .. } if !usage.is_empty() => self.merge(*usage),
            Event::Usage(u) => self.merge(*u),
            Event::BlockDelta {
                delta: Delta::Text(t) | Delta::ToolArgs(t) | Delta::Thinking(t),
                ..
            } => self.output_chars += t.chars().count() as u64,
            Event::Error(_) => self.failed = true,
            _ => {}
        }
    }

    fn merge(&mut self, u: Usage) {
        match &mut self.usage {
            Some(have) => have.merge(u),
            None => self.usage = Some(u),
        }
    }
}

impl StreamObserver for Seen {
    fn usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }
    fn output_text(&mut self, chars: u64) {
        self.output_chars = self.output_chars.saturating_add(chars);
    }
    fn finish_reason(&mut self, _: &str) {}
}

/// Feeds a translated stream's events to [`Seen`].
struct Translating<'a> {
    seen: &'a mut Seen,
    translator: &'a mut StreamTranslator,
    sink: Vec<u8>,
}

impl StreamObserver for Translating<'_> {
    fn usage(&mut self, _: Usage) {}
    fn output_text(&mut self, _: u64) {}
    fn finish_reason(&mut self, _: &str) {}

    fn event_data(&mut self, data: &[u8]) {
        let seen = &mut *self.seen;
        if self
            .translator
            .event(data, &mut self.sink, |e| seen.event(e))
            .is_err()
        {
            seen.failed = true;
        }
        self.sink.clear();
    }
}

impl Call {
    /// Send the request as the primary's attempt would be sent, and read the answer to its
    /// end.
    async fn run(&self, seen: &mut Seen) -> CallOutcome {
        let m = &self.mirror;
        // The primary parsed the same bytes; this cannot fail, and costs only the task.
        let Ok(api) = ApiRequest::parse(m.endpoint, &m.body) else {
            return CallOutcome::ClientError;
        };
        seen.prompt_estimate = api.prompt_tokens_estimate();
        let mut out = Outbound::new(&api, m.output_reservation);
        out.anthropic_headers = m.anthropic_headers.clone();
        let resp =
            match providers::attempt(&self.client, &self.backend, &mut out, self.timeout).await {
                Ok(resp) => resp,
                Err(failure) => return outcome_of(&failure),
            };
        let status = resp.status();
        if !status.is_success() {
            // The answer is dropped unread: a refusal says enough.
            return if status.is_client_error() {
                CallOutcome::ClientError
            } else {
                CallOutcome::Error
            };
        }
        seen.answered = true;
        let dialect = self.backend.provider.dialect(m.endpoint.dialect());
        let stream = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| {
                let t = t.split(';').next().unwrap_or("").trim();
                t.eq_ignore_ascii_case("text/event-stream")
                    || t.eq_ignore_ascii_case("application/vnd.amazon.eventstream")
            });
        let body = resp.into_body();
        let read = if stream {
            drain(body, dialect, &m.request_id, self.max_event, seen).await
        } else {
            whole(body, dialect, &m.request_id, seen).await
        };
        match read {
            Ok(()) if !seen.failed => CallOutcome::Ok,
            _ => CallOutcome::Error,
        }
    }
}

fn outcome_of(f: &Failure) -> CallOutcome {
    match f {
        Failure::Timeout => CallOutcome::Timeout,
        // The candidate cannot take what the client sent (the translation to its API, or
        // its window): the client's request, not the backend, is at fault.
        Failure::Refused(_) | Failure::ContextLength(..) => CallOutcome::ClientError,
        Failure::Connect(_) | Failure::Status { .. } | Failure::CredentialsRefused(..) => {
            CallOutcome::Error
        }
    }
}

/// A whole answer: read, and its usage taken in the backend's dialect.
async fn whole(body: UpstreamBody, dialect: Dialect, id: &str, seen: &mut Seen) -> Result<(), ()> {
    let bytes = Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|_| ())?
        .to_bytes();
    let usage = match dialect {
        Dialect::OpenAiChat => usage_of_body(&bytes).or_else(|| {
            // No usage reported: the text is estimated, as the primary's would be.
            seen.output_chars = crate::synth::output_chars(&bytes).unwrap_or(0);
            None
        }),
        _ => Some(
            crate::translate::response_in(dialect, &bytes, id)
                .map_err(|_| ())?
                .usage,
        ),
    };
    seen.usage = usage;
    Ok(())
}

/// A stream: drained to its end, its usage read event by event in the backend's dialect.
async fn drain(
    mut body: UpstreamBody,
    dialect: Dialect,
    id: &str,
    max_event: usize,
    seen: &mut Seen,
) -> Result<(), ()> {
    enum Reader {
        /// OpenAI's events, read by the same scanner as a primary's.
        OpenAi(SseScanner),
        /// Another dialect's server-sent events, through a translator.
        Sse(SseScanner, Box<StreamTranslator>),
        /// Bedrock's binary event stream, through a translator.
        Binary(Box<StreamTranslator>),
    }
    let translator = || {
        Box::new(StreamTranslator::new(
            dialect,
            Dialect::OpenAiChat,
            "",
            0,
            true,
            id,
        ))
    };
    let mut reader = match dialect {
        Dialect::OpenAiChat => Reader::OpenAi(SseScanner::new(false, max_event)),
        d if d.binary_stream() => Reader::Binary(translator()),
        _ => Reader::Sse(SseScanner::delivering(max_event), translator()),
    };
    let mut sink = Vec::new();
    loop {
        let frame =
            match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
                None => break,
                Some(Err(_)) => return Err(()),
                Some(Ok(frame)) => frame,
            };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let read = match &mut reader {
            Reader::OpenAi(scanner) => scanner.feed(chunk, seen, |_| {}).map_err(|_| ()),
            Reader::Sse(scanner, translator) => {
                let mut obs = Translating {
                    seen,
                    translator,
                    sink: std::mem::take(&mut sink),
                };
                let read = scanner.feed(chunk, &mut obs, |_| {}).map_err(|_| ());
                sink = obs.sink;
                read
            }
            Reader::Binary(translator) => {
                let read = translator
                    .bytes(&chunk, &mut sink, |e| seen.event(e))
                    .map_err(|_| ());
                sink.clear();
                read
            }
        };
        read?;
    }
    match &mut reader {
        Reader::OpenAi(scanner) => {
            let _ = scanner.finish(seen);
        }
        Reader::Sse(scanner, translator) => {
            {
                let mut obs = Translating {
                    seen,
                    translator,
                    sink: Vec::new(),
                };
                let _ = scanner.finish(&mut obs);
            }
            translator.finish(&mut sink, |e| seen.event(e));
        }
        Reader::Binary(translator) => translator.finish(&mut sink, |e| seen.event(e)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::MockStream;

    fn fixture(path: &str) -> Vec<u8> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        std::fs::read(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// A recorded stream served in pieces of `size` bytes, drained as a shadow's is.
    async fn drained(bytes: &[u8], dialect: Dialect, size: usize) -> (Result<(), ()>, Seen) {
        let chunks = bytes.chunks(size).map(Bytes::copy_from_slice).collect();
        let body = UpstreamBody::Mock(MockStream::new(chunks, Duration::ZERO));
        let mut seen = Seen::default();
        let read = drain(body, dialect, "req-1", 1 << 20, &mut seen).await;
        (read, seen)
    }

    fn bedrock(name: &str) -> Vec<u8> {
        let messages: Vec<(String, String, serde_json::Value)> =
            serde_json::from_slice(&fixture(name)).unwrap();
        messages
            .iter()
            .flat_map(|(kind, event, payload)| {
                crate::translate::bedrock::encode_frame(kind, event, payload.to_string().as_bytes())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_drained_stream_gives_its_usage_in_every_dialect() {
        let cases: Vec<(Vec<u8>, Dialect, u64, u64)> = vec![
            (
                fixture("sse/openai-chat-include-usage.sse"),
                Dialect::OpenAiChat,
                19,
                10,
            ),
            (
                fixture("providers/anthropic/stream-text-basic.sse"),
                Dialect::Anthropic,
                11,
                6,
            ),
            (
                fixture("providers/openai-responses/streams/text.sse"),
                Dialect::OpenAiResponses,
                14,
                0,
            ),
            (
                fixture("providers/gemini/stream-text.sse"),
                Dialect::Gemini,
                8,
                9,
            ),
            (
                bedrock("providers/bedrock/stream-text.events.json"),
                Dialect::Bedrock,
                12,
                10,
            ),
        ];
        for (bytes, dialect, input, output) in cases {
            for size in [7, 4096] {
                let (read, seen) = drained(&bytes, dialect, size).await;
                assert_eq!(read, Ok(()), "{dialect:?}");
                assert!(!seen.failed, "{dialect:?}");
                let u = seen
                    .usage
                    .unwrap_or_else(|| panic!("{dialect:?}: no usage"));
                let prompt = u.input.unwrap_or(0) + u.cache_read.unwrap_or(0);
                assert_eq!(prompt, input, "{dialect:?} in pieces of {size}: {u:?}");
                if output > 0 {
                    assert_eq!(u.output, Some(output), "{dialect:?}: {u:?}");
                } else {
                    assert!(u.output.is_some_and(|o| o > 0), "{dialect:?}: {u:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_streamed_error_is_an_error_and_a_silent_usage_is_estimated() {
        let (_, seen) = drained(
            &fixture("providers/anthropic/stream-error-overloaded.sse"),
            Dialect::Anthropic,
            64,
        )
        .await;
        assert!(seen.failed, "an error event");
        // Without usage, the text seen is estimated and the prompt is the request's.
        let text =
            b"data: {\"choices\":[{\"delta\":{\"content\":\"twelve chars\"}}]}\n\ndata: [DONE]\n\n";
        let (read, mut seen) = drained(text, Dialect::OpenAiChat, 5).await;
        assert_eq!(read, Ok(()));
        seen.answered = true;
        seen.prompt_estimate = 9;
        let u = seen.charged();
        assert_eq!((u.input, u.output), (Some(9), Some(3)));
    }
}
