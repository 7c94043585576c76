//! Response bodies: buffered answers, and streams passed through event by event.
//!
//! A streamed upstream body is wrapped in [`MeteredStream`]: each upstream chunk is split at
//! server-sent-event boundaries and complete events go to the client at once (nothing waits
//! for the stream to end). Events that carry `usage` are read for metering; the final usage
//! chunk is dropped when the client did not ask for it. The stream owns the request's
//! [`Meter`], so metering runs when the stream ends, fails, or the client goes away (the body
//! is dropped, which also drops the upstream body and so cancels the upstream request).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use memchr::memmem;
use serde::Deserialize;

use crate::meter::Meter;
use crate::metrics::UpstreamErrorKind;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Token usage as providers report it.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct UsageWire {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// Usage of a non-streamed response body, if it reports one.
pub fn usage_of_body(body: &[u8]) -> Option<UsageWire> {
    #[derive(Deserialize)]
    struct WithUsage {
        #[serde(default)]
        usage: Option<UsageWire>,
    }
    memmem::find(body, b"\"usage\"")?;
    serde_json::from_slice::<WithUsage>(body).ok()?.usage
}

/// An upstream response body: from the network or from the built-in mock.
pub enum UpstreamBody {
    Http(Incoming),
    Mock(MockStream),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Http(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::Mock(m) => Pin::new(m).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http(b) => b.is_end_stream(),
            Self::Mock(m) => m.chunks.is_empty(),
        }
    }
}

/// Pre-built chunks released one at a time with a delay between them.
pub struct MockStream {
    chunks: VecDeque<Bytes>,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl MockStream {
    pub fn new(chunks: Vec<Bytes>, delay: Duration) -> Self {
        Self {
            chunks: chunks.into(),
            delay,
            sleep: None,
        }
    }
}

impl Body for MockStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(sleep) = &mut this.sleep {
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        match this.chunks.pop_front() {
            None => Poll::Ready(None),
            Some(chunk) => {
                if !this.delay.is_zero() && !this.chunks.is_empty() {
                    this.sleep = Some(Box::pin(tokio::time::sleep(this.delay)));
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }
}

/// The body of every response the proxy sends.
pub enum ProxyBody {
    Full(Option<Bytes>),
    Stream(Box<MeteredStream>),
}

impl ProxyBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Some(b.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Stream(_) => SizeHint::default(),
        }
    }
}

/// Splits an SSE byte stream into events and decides which to forward.
#[derive(Default)]
struct SseScanner {
    pending: BytesMut,
    strip_usage: bool,
}

fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `data:` payload of one event (single-line data, as LLM providers send).
fn event_data(event: &[u8]) -> Option<&[u8]> {
    let start = memmem::find(event, b"data:")?;
    let rest = &event[start + 5..];
    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
    let end = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn has_text(data: &[u8]) -> bool {
    // A delta with non-empty content (chat) or text (completions).
    [&b"\"content\":\""[..], &b"\"text\":\""[..]]
        .iter()
        .any(|pat| memmem::find(data, pat).is_some_and(|i| data.get(i + pat.len()) != Some(&b'"')))
}

impl SseScanner {
    /// Feed one upstream chunk; returns the bytes to forward now.
    fn feed(&mut self, chunk: Bytes, meter: &mut Meter) -> Option<Bytes> {
        if self.pending.is_empty() && !self.strip_usage_needed(&chunk) && chunk.ends_with(b"\n\n") {
            // Fast path: whole events, nothing to strip: inspect and forward the chunk as is.
            let mut rest = &chunk[..];
            while let Some(end) = event_end(rest) {
                self.observe(&rest[..end], meter);
                rest = &rest[end..];
            }
            return Some(chunk);
        }
        self.pending.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            if self.observe(&event, meter) {
                out.extend_from_slice(&event);
            }
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    fn strip_usage_needed(&self, chunk: &[u8]) -> bool {
        self.strip_usage && memmem::find(chunk, b"\"usage\":{").is_some()
    }

    /// Read one complete event for metering; returns whether to forward it.
    fn observe(&mut self, event: &[u8], meter: &mut Meter) -> bool {
        let Some(data) = event_data(event) else {
            return true;
        };
        if data == b"[DONE]" {
            return true;
        }
        if has_text(data) {
            meter.saw_output_chunk();
        }
        if memmem::find(data, b"\"usage\":{").is_some() {
            #[derive(Deserialize)]
            struct Chunk {
                #[serde(default)]
                usage: Option<UsageWire>,
                #[serde(default)]
                choices: Option<Vec<serde::de::IgnoredAny>>,
            }
            if let Ok(c) = serde_json::from_slice::<Chunk>(data)
                && let Some(u) = c.usage
            {
                meter.set_usage(u);
                let usage_only = c.choices.is_none_or(|v| v.is_empty());
                return !(self.strip_usage && usage_only);
            }
        }
        true
    }

    fn remainder(&mut self) -> Option<Bytes> {
        (!self.pending.is_empty()).then(|| self.pending.split().freeze())
    }
}

/// A streamed response on its way to the client, metered as it goes.
pub struct MeteredStream {
    upstream: UpstreamBody,
    scanner: SseScanner,
    meter: Option<Meter>,
    upstream_done: bool,
    /// An upstream error seen while bytes were still to be sent; reported next poll.
    failed: Option<BoxError>,
    /// Bytes gathered for the next write to the client.
    held: Gather,
    /// The turn the held bytes wait for, while a burst may still be arriving.
    turn: Option<Turn>,
    /// Turns waited for the held bytes so far.
    turns: u8,
    /// Whether upstream data arrived since the current turn began.
    fresh: bool,
}

/// Frames already waiting upstream are joined up to this size into one write to the client,
/// so a burst of small events costs one syscall, not one per event.
const COALESCE_LIMIT: usize = 64 * 1024;

/// How many scheduler turns held bytes may wait for more of the same burst. The upstream
/// connection runs as its own task and hands over one frame at a time; while a turn brings
/// new frames the burst goes on, and the first turn that brings none sends what was gathered.
/// A paced stream (one event every few milliseconds) so waits one turn: the runtime runs the
/// tasks that are ready and polls its sockets once, microseconds.
const MAX_TURNS: u8 = 32;

/// One scheduler turn: `tokio::task::yield_now` wakes its waker only after the tasks that are
/// ready have run. The flag tells a poll caused by that wake from an earlier one (hyper polls
/// a body again at once when its write buffer is flushed).
struct Turn {
    passed: Arc<TurnWaker>,
}

struct TurnWaker {
    passed: AtomicBool,
    task: Waker,
}

impl Wake for TurnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.passed.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl Turn {
    fn start(cx: &Context<'_>) -> Self {
        let passed = Arc::new(TurnWaker {
            passed: AtomicBool::new(false),
            task: cx.waker().clone(),
        });
        // The first poll hands the waker to the runtime's deferred list; the future itself
        // holds nothing more and may go.
        let wait = std::pin::pin!(tokio::task::yield_now());
        let waker = Waker::from(passed.clone());
        if wait.poll(&mut Context::from_waker(&waker)).is_ready() {
            passed.wake_by_ref();
        }
        Self { passed }
    }

    fn passed(&self) -> bool {
        self.passed.passed.load(Ordering::Acquire)
    }
}

/// Bytes joined for one write: the first chunk as is, later ones copied after it.
#[derive(Default)]
struct Gather {
    first: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Gather {
    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.joined.as_ref().map_or(0, BytesMut::len)
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.joined.is_none()
    }

    fn push(&mut self, b: Bytes) {
        match (self.first.take(), self.joined.as_mut()) {
            (None, None) => self.first = Some(b),
            (Some(f), None) => {
                let mut m = BytesMut::with_capacity((f.len() + b.len()).max(4096));
                m.extend_from_slice(&f);
                m.extend_from_slice(&b);
                self.joined = Some(m);
            }
            (None, Some(m)) => m.extend_from_slice(&b),
            (Some(_), Some(_)) => unreachable!("first is taken once joined exists"),
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        match (self.first.take(), self.joined.take()) {
            (Some(f), _) => Some(f),
            (None, Some(j)) => Some(j.freeze()),
            (None, None) => None,
        }
    }
}

impl MeteredStream {
    pub fn new(upstream: UpstreamBody, meter: Meter, strip_usage: bool) -> Self {
        Self {
            upstream,
            scanner: SseScanner {
                pending: BytesMut::new(),
                strip_usage,
            },
            meter: Some(meter),
            upstream_done: false,
            failed: None,
            held: Gather::default(),
            turn: None,
            turns: 0,
            fresh: false,
        }
    }
}

impl Body for MeteredStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.held.is_empty()
            && let Some(e) = this.failed.take()
        {
            if let Some(m) = this.meter.take() {
                m.finish_stream(Some(UpstreamErrorKind::Stream));
            }
            return Poll::Ready(Some(Err(e)));
        }
        let Some(meter) = this.meter.as_mut() else {
            return Poll::Ready(None);
        };
        // Gather what the upstream has ready.
        while !this.upstream_done && this.failed.is_none() && this.held.len() < COALESCE_LIMIT {
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => {
                    this.fresh = true;
                    if let Ok(data) = frame.into_data()
                        && let Some(out) = this.scanner.feed(data, meter)
                    {
                        this.held.push(out);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    if this.held.is_empty() {
                        if let Some(m) = this.meter.take() {
                            m.finish_stream(Some(UpstreamErrorKind::Stream));
                        }
                        return Poll::Ready(Some(Err(e)));
                    }
                    this.failed = Some(e);
                }
                Poll::Ready(None) => this.upstream_done = true,
            }
        }
        let more_may_come =
            !this.upstream_done && this.failed.is_none() && this.held.len() < COALESCE_LIMIT;
        if this.held.is_empty() && more_may_come {
            // Nothing to send: the upstream wakes this task when a frame arrives.
            this.turn = None;
            return Poll::Pending;
        }
        if more_may_come {
            // Mid-burst: wait for the next turn while it keeps bringing frames.
            match &this.turn {
                None => {
                    this.turn = Some(Turn::start(cx));
                    this.fresh = false;
                    return Poll::Pending;
                }
                Some(t) if !t.passed() => return Poll::Pending,
                Some(_) if this.fresh && this.turns < MAX_TURNS => {
                    this.turns += 1;
                    this.turn = Some(Turn::start(cx));
                    this.fresh = false;
                    return Poll::Pending;
                }
                Some(_) => {}
            }
        }
        if this.upstream_done {
            if let Some(rest) = this.scanner.remainder() {
                this.held.push(rest);
            }
            if let Some(m) = this.meter.take() {
                m.finish_stream(None);
            }
        }
        this.turn = None;
        this.turns = 0;
        Poll::Ready(this.held.take().map(|b| Ok(Frame::data(b))))
    }
}
