//! Response bodies: buffered answers, and streams passed through event by event.
//!
//! A streamed upstream body is wrapped in [`MeteredStream`]: each upstream chunk goes through
//! the [`SseScanner`], which splits it at server-sent-event boundaries (any line ending of the
//! spec), and complete events go to the client at once (nothing waits for the stream to end),
//! byte for byte as the upstream wrote them. Each event's JSON is read for metering whatever
//! its formatting: usage, generated text (for an estimate when no usage comes) and the finish
//! reason. The usage-only chunk is dropped when the client did not ask for it. An event larger
//! than a limit ends the stream with an error event. The stream owns the request's [`Meter`],
//! so metering runs when the stream ends, fails, or the client goes away (the body is
//! dropped, which also drops the upstream body and so cancels the upstream request).
//!
//! Nothing is committed to the client before the upstream's first bytes: the proxy waits for
//! them with [`first_bytes`] (an upstream silent until then is a failed attempt, retried like
//! any other) and hands them in with [`MeteredStream::starting_with`].

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

use crate::canonical::{ApiError, Delta, ErrorKind, Event, Usage};
use crate::meter::Meter;
use crate::metrics::UpstreamErrorKind;
use crate::translate::{Dialect, StreamTranslator, StreamWatcher};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Token usage as OpenAI-shaped upstreams report it.
pub use crate::translate::openai_chat::OpenAiUsage as UsageWire;

/// Usage of a non-streamed OpenAI-shaped response body, if it reports one, normalized.
pub fn usage_of_body(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct WithUsage {
        #[serde(default)]
        usage: Option<UsageWire>,
    }
    memmem::find(body, b"\"usage\"")?;
    Some(
        serde_json::from_slice::<WithUsage>(body)
            .ok()?
            .usage?
            .normalized(),
    )
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

/// Wait for the first bytes of an upstream body; `None` when it ended without any. Frames
/// without data (trailers) and empty ones are passed over. The caller bounds the wait.
pub async fn first_bytes(body: &mut UpstreamBody) -> Result<Option<Bytes>, BoxError> {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data()
            && !data.is_empty()
        {
            return Ok(Some(data));
        }
    }
    Ok(None)
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
    /// A stream whose bytes are kept for the response cache as they pass.
    Recorded(Box<crate::cache::Recording>),
    /// A stream whose answer text a route's masking rules rewrite on the way.
    Masked(Box<crate::mask::MaskedStream>),
    /// Both: the masked text is what the cache keeps, as the client got it.
    MaskedRecorded(Box<crate::cache::Recording<crate::mask::MaskedStream>>),
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
            Self::Recorded(s) => Pin::new(s.as_mut()).poll_frame(cx),
            Self::Masked(s) => Pin::new(s.as_mut()).poll_frame(cx),
            Self::MaskedRecorded(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Stream(_) | Self::Recorded(_) | Self::Masked(_) | Self::MaskedRecorded(_) => {
                false
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Stream(_) | Self::Recorded(_) | Self::Masked(_) | Self::MaskedRecorded(_) => {
                SizeHint::default()
            }
        }
    }
}

/// The largest server-sent event the proxy holds while it waits for the event's end. An
/// upstream that sends more without ending the event has its stream ended with an error.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// Why a stream could not be scanned to its end.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("upstream sent a server-sent event larger than {limit} bytes")]
    EventTooLarge { limit: usize },
    #[error("the upstream sent nothing for {0:?} (the route's streamIdleTimeout)")]
    Idle(Duration),
    #[error("the stream lasted longer than {0:?} (the route's streamTimeout)")]
    TooLong(Duration),
}

impl ScanError {
    fn code(&self) -> &'static str {
        match self {
            Self::EventTooLarge { .. } => "upstream_event_too_large",
            Self::Idle(_) | Self::TooLong(_) => "upstream_timeout",
        }
    }

    fn metric_kind(&self) -> UpstreamErrorKind {
        match self {
            Self::EventTooLarge { .. } => UpstreamErrorKind::Stream,
            Self::Idle(_) | Self::TooLong(_) => UpstreamErrorKind::Timeout,
        }
    }
}

/// What the scanner reports while it reads a stream: [`Meter`] in the proxy, [`Tally`] in tests.
pub trait StreamObserver {
    /// Usage the upstream reported; a later report replaces an earlier one.
    fn usage(&mut self, usage: Usage);
    /// Generated text of one event, in characters after JSON unescaping.
    fn output_text(&mut self, chars: u64);
    /// A choice ended with this `finish_reason`.
    fn finish_reason(&mut self, reason: &str);
    /// The data of one whole event, for a scanner that delivers events instead of
    /// forwarding them ([`SseScanner::delivering`]).
    fn event_data(&mut self, _data: &[u8]) {}
}

/// A [`StreamObserver`] that only adds up: for tests, fuzzing and tools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub usage: Option<Usage>,
    pub output_chars: u64,
    pub finish_reason: Option<String>,
}

impl StreamObserver for Tally {
    fn usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }
    fn output_text(&mut self, chars: u64) {
        self.output_chars += chars;
    }
    fn finish_reason(&mut self, reason: &str) {
        self.finish_reason = Some(reason.to_owned());
    }
}

/// Splits an SSE byte stream into events (as the HTML spec defines them: lines end in LF,
/// CRLF or CR, a blank line ends an event, `data:` lines join with LF, `:` starts a comment)
/// and decides which to forward.
///
/// ```text
///  chunk ─► lines from `scanned` on ─► fields of the event being received
///                                   └► blank line: observe the data, forward or strip
///  forwarded: the upstream's own bytes, sliced, never re-serialized
/// ```
///
/// Each byte is looked at once: complete events in a chunk are read in place and forwarded as
/// slices of it; only the unfinished tail is copied, and later chunks are read from where the
/// last look stopped.
pub struct SseScanner {
    /// The event being received, from its first byte.
    pending: BytesMut,
    /// Where the first line not yet read starts in `pending`.
    scanned: usize,
    /// How far that line has been searched for its end.
    searched: usize,
    lines: Lines,
    started: bool,
    /// The first bytes of the stream while they may still be a split byte-order mark.
    head: Vec<u8>,
}

/// Field state of the event being received, and the stream's settings.
struct Lines {
    data: Data,
    after_cr: AfterCr,
    strip_usage: bool,
    max_event: usize,
    /// What happens to each event besides what `observe` reads.
    mode: Mode,
    /// Drop Azure OpenAI's filter-only chunks (the backend is Azure's).
    azure: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// OpenAI events: read by `observe`, forwarded (or stripped).
    Observe,
    /// Each event's data goes to the observer, nothing is forwarded (a translated stream).
    Deliver,
    /// Each event's data goes to the observer, and the event is forwarded as it came.
    Watch,
}

/// The `data` field of the event being received. Positions are relative to the event's start.
enum Data {
    None,
    Line(usize, usize),
    Joined(Vec<u8>),
}

/// A line ended in CR as the last byte of a chunk: an LF opening the next chunk ends the
/// same line (CRLF), it is no blank line of its own.
#[derive(Clone, Copy)]
enum AfterCr {
    No,
    InEvent,
    EventEnd { forwarded: bool },
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseScanner {
    /// `strip_usage`: drop the usage-only chunk (the client did not ask for usage).
    /// `max_event`: the largest event held while waiting for its end.
    pub fn new(strip_usage: bool, max_event: usize) -> Self {
        Self {
            pending: BytesMut::new(),
            scanned: 0,
            searched: 0,
            lines: Lines {
                data: Data::None,
                after_cr: AfterCr::No,
                strip_usage,
                max_event,
                mode: Mode::Observe,
                azure: false,
            },
            started: false,
            head: Vec::new(),
        }
    }

    /// A scanner that forwards nothing: each complete event's data goes to
    /// [`StreamObserver::event_data`], for a translator to write the client's events.
    pub fn delivering(max_event: usize) -> Self {
        let mut s = Self::new(false, max_event);
        s.lines.mode = Mode::Deliver;
        s
    }

    /// Also drop Azure OpenAI's prompt-filter and annotation-only chunks (docs/providers.md
    /// 3.3): for a stream from an Azure backend only; other servers' chunks are never
    /// second-guessed.
    pub fn with_azure_filter(mut self) -> Self {
        self.lines.azure = true;
        self
    }

    /// A scanner that forwards every event as it came and hands its data to
    /// [`StreamObserver::event_data`] (a dialect `observe` does not read).
    pub fn watching(max_event: usize) -> Self {
        let mut s = Self::new(false, max_event);
        s.lines.mode = Mode::Watch;
        s
    }

    /// Feed one upstream chunk; `emit` receives the bytes to forward now, in order.
    pub fn feed(
        &mut self,
        mut chunk: Bytes,
        obs: &mut impl StreamObserver,
        mut emit: impl FnMut(Bytes),
    ) -> Result<(), ScanError> {
        if chunk.is_empty() {
            return Ok(());
        }
        match std::mem::replace(&mut self.lines.after_cr, AfterCr::No) {
            AfterCr::No => {}
            AfterCr::InEvent if chunk[0] == b'\n' => {
                self.pending.extend_from_slice(b"\n");
                self.scanned += 1;
                self.searched = self.scanned;
                chunk = chunk.slice(1..);
            }
            AfterCr::EventEnd { forwarded } if chunk[0] == b'\n' => {
                // The LF ends the event already decided on: it goes where the event went.
                if forwarded {
                    emit(chunk.slice(..1));
                }
                chunk = chunk.slice(1..);
            }
            AfterCr::InEvent | AfterCr::EventEnd { .. } => {}
        }
        let mut from = 0;
        if !self.started && !chunk.is_empty() {
            // A byte-order mark may arrive split over the first reads: hold back a start
            // that could still be one, so every way of cutting the stream reads the same.
            if !self.head.is_empty() {
                let mut joined = std::mem::take(&mut self.head);
                joined.extend_from_slice(&chunk);
                chunk = Bytes::from(joined);
            }
            if chunk.len() < BOM.len() && BOM.starts_with(&chunk) {
                self.head = chunk.to_vec();
                return Ok(());
            }
            self.started = true;
            if chunk.starts_with(BOM) {
                from = BOM.len();
            }
        }
        let mut strip = Vec::new();
        let (complete, scanned) = if self.pending.is_empty() {
            // Common case: the chunk starts an event. Read it in place.
            let mut block = 0;
            let mut pos = from;
            let mut searched = from;
            let scanned = self
                .lines
                .scan(&chunk, &mut block, &mut pos, &mut searched, obs, &mut strip)
                .and_then(|()| self.lines.bounded(chunk.len() - block));
            if scanned.is_ok() {
                self.pending.extend_from_slice(&chunk[block..]);
                self.scanned = pos - block;
                self.searched = searched - block;
            }
            (chunk.slice(..block), scanned)
        } else {
            self.pending.extend_from_slice(&chunk);
            let mut block = 0;
            let mut pos = self.scanned;
            let mut searched = self.searched;
            let scanned = self
                .lines
                .scan(
                    &self.pending,
                    &mut block,
                    &mut pos,
                    &mut searched,
                    obs,
                    &mut strip,
                )
                .and_then(|()| self.lines.bounded(self.pending.len() - block));
            self.scanned = pos - block;
            self.searched = searched - block;
            (self.take_complete(block), scanned)
        };
        // Events completed before a failure still go out.
        let mut at = 0;
        for r in strip {
            if r.start > at {
                emit(complete.slice(at..r.start));
            }
            at = r.end;
        }
        if at < complete.len() {
            emit(if at == 0 {
                complete
            } else {
                complete.slice(at..)
            });
        }
        if scanned.is_err() {
            // The oversized event is dropped; the stream ends here.
            self.pending = BytesMut::new();
            self.scanned = 0;
            self.searched = 0;
            self.lines.data = Data::None;
        }
        scanned
    }

    /// The first `block` bytes of `pending`: complete events. The rest (an unfinished event)
    /// is copied to a buffer of its own rather than split off, since a split-off buffer
    /// grows by exact reallocations and an event arriving in many chunks would be copied
    /// over and over.
    fn take_complete(&mut self, block: usize) -> Bytes {
        if block == 0 {
            return Bytes::new();
        }
        let rest = if block == self.pending.len() {
            BytesMut::new()
        } else {
            BytesMut::from(&self.pending[block..])
        };
        let mut done = std::mem::replace(&mut self.pending, rest);
        done.truncate(block);
        done.freeze()
    }

    /// The stream ended: what is left is an event without its blank line. SSE clients
    /// discard it, so it is passed on as it came, never stripped; but the upstream did the
    /// work, so its data (up to the end, line ended or not) is metered.
    pub fn finish(&mut self, obs: &mut impl StreamObserver) -> Option<Bytes> {
        if !self.head.is_empty() {
            // The stream was nothing but the start of a byte-order mark.
            return Some(Bytes::from(std::mem::take(&mut self.head)));
        }
        if self.pending.is_empty() {
            return None;
        }
        let len = self.pending.len();
        if self.scanned < len {
            self.lines.field(&self.pending, 0, self.scanned, len);
        }
        if !matches!(self.lines.data, Data::None) {
            self.lines.dispatch(&self.pending, 0, obs);
        }
        self.scanned = 0;
        self.searched = 0;
        Some(self.pending.split().freeze())
    }
}

impl Lines {
    fn bounded(&self, unfinished: usize) -> Result<(), ScanError> {
        if unfinished > self.max_event {
            return Err(ScanError::EventTooLarge {
                limit: self.max_event,
            });
        }
        Ok(())
    }

    /// Read the complete lines of `buf` from `pos` (a line start, searched for its end up to
    /// `searched`); `block` is where the current event starts. Events to drop are added to
    /// `strip`.
    fn scan(
        &mut self,
        buf: &[u8],
        block: &mut usize,
        pos: &mut usize,
        searched: &mut usize,
        obs: &mut impl StreamObserver,
        strip: &mut Vec<std::ops::Range<usize>>,
    ) -> Result<(), ScanError> {
        loop {
            let from = (*searched).max(*pos);
            let Some(i) = memchr::memchr2(b'\n', b'\r', &buf[from..]) else {
                *searched = buf.len();
                return Ok(());
            };
            let end = from + i;
            let (next, cr_last) = match (buf[end], buf.get(end + 1)) {
                (b'\r', Some(b'\n')) => (end + 2, false),
                (b'\r', None) => (end + 1, true),
                _ => (end + 1, false),
            };
            if end == *pos {
                self.bounded(next - *block)?;
                let forwarded = self.dispatch(buf, *block, obs);
                if !forwarded {
                    strip.push(*block..next);
                }
                if cr_last {
                    self.after_cr = AfterCr::EventEnd { forwarded };
                }
                *block = next;
            } else {
                self.field(buf, *block, *pos, end);
                if cr_last {
                    self.after_cr = AfterCr::InEvent;
                }
            }
            *pos = next;
            *searched = next;
        }
    }

    /// One non-blank line. Only `data` matters here; `event`, `id`, `retry` and comments
    /// pass through with the event's bytes.
    fn field(&mut self, buf: &[u8], block: usize, start: usize, end: usize) {
        let line = &buf[start..end];
        if line.first() == Some(&b':') {
            return;
        }
        let (name, mut value) = match memchr::memchr(b':', line) {
            Some(c) => (&line[..c], start + c + 1),
            None => (line, end),
        };
        if name != b"data" {
            return;
        }
        if buf.get(value) == Some(&b' ') && value < end {
            value += 1;
        }
        self.data = match std::mem::replace(&mut self.data, Data::None) {
            Data::None => Data::Line(value - block, end - block),
            Data::Line(s, e) => {
                let first = &buf[block + s..block + e];
                let mut joined = Vec::with_capacity(first.len() + 1 + end - value);
                joined.extend_from_slice(first);
                joined.push(b'\n');
                joined.extend_from_slice(&buf[value..end]);
                Data::Joined(joined)
            }
            Data::Joined(mut joined) => {
                joined.push(b'\n');
                joined.extend_from_slice(&buf[value..end]);
                Data::Joined(joined)
            }
        };
    }

    /// The event starting at `block` is complete: observe it; returns whether to forward it.
    fn dispatch(&mut self, buf: &[u8], block: usize, obs: &mut impl StreamObserver) -> bool {
        let data = match &self.data {
            Data::None => None,
            Data::Line(s, e) => Some(&buf[block + s..block + e]),
            Data::Joined(d) => Some(&d[..]),
        };
        let forward = match (data, self.mode) {
            (None, mode) => mode != Mode::Deliver,
            (Some(d), Mode::Observe) => observe(d, self.strip_usage, self.azure, obs),
            (Some(d), mode) => {
                obs.event_data(d);
                mode == Mode::Watch
            }
        };
        self.data = Data::None;
        forward
    }
}

/// Read one event's data for metering; returns whether to forward the event.
///
/// Keys are found from the colons that follow them, whatever the whitespace, key order or
/// escaping around them. In valid JSON a `"` not escaped by an odd run of backslashes always
/// delimits a string, so a colon after such a quote follows a key, and text inside a string
/// (where every quote is escaped) never reads as one. Text values are counted where they lie
/// and skipped; only an event with a `usage` object is deserialized (once per stream).
fn observe(data: &[u8], strip_usage: bool, azure: bool, obs: &mut impl StreamObserver) -> bool {
    if data == b"[DONE]" {
        return true;
    }
    let mut chars = 0u64;
    let mut usage = false;
    // Azure's prompt-filter chunk (`"choices": []`, no usage) and annotation-only chunks (a
    // choice without `delta`, or `text` for completions) are looked at further, below
    // (docs/providers.md 3.3).
    let (mut no_choices, mut some_choice, mut delta_or_text) = (false, false, false);
    let mut i = 0;
    while let Some(c) = memchr::memchr(b':', &data[i..]) {
        let colon = i + c;
        i = colon + 1;
        let Some(close) = data[..colon]
            .iter()
            .rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        else {
            continue;
        };
        if data[close] != b'"' || escaped(data, close) {
            continue;
        }
        let Some(open) = opening_quote(data, close) else {
            continue;
        };
        let value = skip_ws(data, colon + 1);
        match &data[open..=close] {
            b"\"choices\"" if data.get(value) == Some(&b'[') => {
                if data.get(skip_ws(data, value + 1)) == Some(&b']') {
                    no_choices = true;
                } else {
                    some_choice = true;
                }
            }
            b"\"delta\"" | b"\"text\"" => delta_or_text = true,
            _ => {}
        }
        match (Key::of(&data[open..=close]), data.get(value)) {
            (Key::Text, Some(b'"')) => {
                let Some(end) = string_end(data, value + 1) else {
                    break;
                };
                chars += json_str_chars(&data[value + 1..end]);
                i = end + 1;
            }
            (Key::FinishReason, Some(b'"')) => {
                let Some(end) = string_end(data, value + 1) else {
                    break;
                };
                let raw = &data[value + 1..end];
                if memchr::memchr(b'\\', raw).is_none() {
                    obs.finish_reason(&String::from_utf8_lossy(raw));
                } else if let Ok(s) = serde_json::from_slice::<String>(&data[value..=end]) {
                    obs.finish_reason(&s);
                }
                i = end + 1;
            }
            (Key::Usage, Some(b'{')) => usage = true,
            _ => {}
        }
    }
    if chars > 0 {
        obs.output_text(chars);
    }
    if azure && !usage && (no_choices || (some_choice && !delta_or_text)) {
        // Dropped: the prompt-filter chunk (no choices, `prompt_filter_results` or the older
        // `prompt_annotations`) and chunks whose every choice is an annotation (no delta, no
        // text, no finish reason: a `content_filter` finish is kept, no logprobs); never a
        // chunk with an `error`.
        #[derive(Deserialize)]
        struct Annotated {
            choices: Vec<AnnotatedChoice>,
            #[serde(default)]
            error: Option<serde::de::IgnoredAny>,
            #[serde(default)]
            prompt_filter_results: Option<serde::de::IgnoredAny>,
            #[serde(default)]
            prompt_annotations: Option<serde::de::IgnoredAny>,
        }
        #[derive(Deserialize)]
        struct AnnotatedChoice {
            #[serde(default)]
            delta: Option<serde::de::IgnoredAny>,
            #[serde(default)]
            text: Option<serde::de::IgnoredAny>,
            #[serde(default)]
            finish_reason: Option<serde::de::IgnoredAny>,
            #[serde(default)]
            logprobs: Option<serde::de::IgnoredAny>,
        }
        return match serde_json::from_slice::<Annotated>(data) {
            Ok(a) if a.choices.is_empty() => {
                a.error.is_some()
                    || (a.prompt_filter_results.is_none() && a.prompt_annotations.is_none())
            }
            Ok(a) => {
                a.error.is_some()
                    || a.choices.iter().any(|c| {
                        c.delta.is_some()
                            || c.text.is_some()
                            || c.finish_reason.is_some()
                            || c.logprobs.is_some()
                    })
            }
            Err(_) => true,
        };
    }
    if !usage {
        return true;
    }
    // A `usage` object somewhere: read the event as a whole, so only the top-level one counts.
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        usage: Option<UsageWire>,
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
    }
    match serde_json::from_slice::<Chunk>(data) {
        Ok(Chunk {
            usage: Some(u),
            choices,
        }) => {
            obs.usage(u.normalized());
            let usage_only = choices.is_none_or(|c| c.is_empty());
            !(strip_usage && usage_only)
        }
        _ => true,
    }
}

/// Keys whose values the meter reads.
#[derive(Clone, Copy)]
enum Key {
    /// Generated text: chat `content`, completions `text`, reasoning, tool call arguments.
    Text,
    FinishReason,
    Usage,
    Other,
}

impl Key {
    /// `quoted`: the key with its quotes, as it appears in the JSON.
    fn of(quoted: &[u8]) -> Self {
        let raw = &quoted[1..quoted.len() - 1];
        if memchr::memchr(b'\\', raw).is_some() {
            // A key spelled with escapes: rare, so decoding it may cost an allocation.
            return match serde_json::from_slice::<String>(quoted) {
                Ok(k) => Self::of_name(k.as_bytes()),
                Err(_) => Self::Other,
            };
        }
        Self::of_name(raw)
    }

    fn of_name(name: &[u8]) -> Self {
        match name {
            // Not `reasoning`: servers that send it repeat `reasoning_content` in it.
            b"content" | b"text" | b"reasoning_content" | b"arguments" => Self::Text,
            b"finish_reason" => Self::FinishReason,
            b"usage" => Self::Usage,
            _ => Self::Other,
        }
    }
}

/// Index of the `"` that closes the string whose body starts at `from`.
fn string_end(data: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', data.get(from..)?)?;
        if data[at] == b'"' {
            return Some(at);
        }
        from = at + 2;
    }
}

/// Whether the quote at `q` is escaped: preceded by an odd run of backslashes.
fn escaped(data: &[u8], q: usize) -> bool {
    data[..q].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
}

/// The quote that opens the string closed at `close`: the nearest unescaped one before it.
fn opening_quote(data: &[u8], mut close: usize) -> Option<usize> {
    loop {
        let q = memchr::memrchr(b'"', &data[..close])?;
        if !escaped(data, q) {
            return Some(q);
        }
        close = q;
    }
}

fn skip_ws(data: &[u8], mut i: usize) -> usize {
    while matches!(data.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Characters of a JSON string body once unescaped (a surrogate pair is one character).
fn json_str_chars(raw: &[u8]) -> u64 {
    let utf8_chars = |b: &[u8]| b.iter().filter(|&&c| (c as i8) >= -0x40).count() as u64;
    let mut n = 0;
    let mut k = 0;
    while let Some(r) = memchr::memchr(b'\\', &raw[k..]) {
        let esc = k + r;
        n += utf8_chars(&raw[k..esc]);
        match raw.get(esc + 1) {
            Some(b'u') => {
                let low_surrogate = raw
                    .get(esc + 2..esc + 6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
                    .is_some_and(|c| (0xDC00..=0xDFFF).contains(&c));
                n += u64::from(!low_surrogate);
                k = (esc + 6).min(raw.len());
            }
            Some(_) => {
                n += 1;
                k = esc + 2;
            }
            None => return n,
        }
    }
    n + utf8_chars(&raw[k..])
}

/// An OpenAI-shaped error event: the last thing a client reads from a stream cut short.
fn error_event(e: &ScanError) -> Bytes {
    let body = serde_json::json!({"error": {
        "message": e.to_string(),
        "type": "upstream_error",
        "param": null,
        "code": e.code(),
    }});
    Bytes::from(format!("data: {body}\n\n"))
}

/// A streamed response on its way to the client, metered as it goes.
pub struct MeteredStream {
    upstream: UpstreamBody,
    /// The upstream's first bytes, read before the response was committed; sent first.
    first: Option<Bytes>,
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
    /// Ends the stream when the upstream is silent this long (reset by every frame).
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// Ends the stream at this point, however lively.
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// How the stream failed, for the meter.
    failure_kind: UpstreamErrorKind,
    /// Set when the upstream speaks another dialect than the client: events are translated
    /// instead of forwarded.
    translator: Option<Box<StreamTranslator>>,
    /// Set when events pass through in a dialect the OpenAI scanner does not read.
    watcher: Option<Box<StreamWatcher>>,
    /// The client's dialect, for the error event of a failure of the gateway's.
    dialect: Dialect,
}

/// The observer of a passed-through stream in another dialect than OpenAI's.
struct Watching<'a> {
    meter: &'a mut Meter,
    watcher: &'a mut StreamWatcher,
}

impl StreamObserver for Watching<'_> {
    fn usage(&mut self, _: Usage) {}
    fn output_text(&mut self, _: u64) {}
    fn finish_reason(&mut self, _: &str) {}

    fn event_data(&mut self, data: &[u8]) {
        let meter = &mut *self.meter;
        self.watcher.event(data, |e| meter_event(meter, e));
    }
}

/// The observer of a translated stream: each upstream event goes through the translator,
/// and the canonical events it makes are metered.
struct Translating<'a> {
    meter: &'a mut Meter,
    translator: &'a mut StreamTranslator,
    out: Vec<u8>,
    failed: Option<String>,
}

impl StreamObserver for Translating<'_> {
    fn usage(&mut self, _: Usage) {}
    fn output_text(&mut self, _: u64) {}
    fn finish_reason(&mut self, _: &str) {}

    fn event_data(&mut self, data: &[u8]) {
        let meter = &mut *self.meter;
        if let Err(e) = self
            .translator
            .event(data, &mut self.out, |e| meter_event(meter, e))
            && self.failed.is_none()
        {
            self.failed = Some(e);
        }
    }
}

/// What the meter reads from a canonical event.
fn meter_event(meter: &mut Meter, e: &Event) {
    match e {
        Event::MessageStart { usage, .. } if !usage.is_empty() => meter.merge_usage(*usage),
        Event::Usage(u) => meter.merge_usage(*u),
        Event::BlockDelta {
            delta: Delta::Text(t) | Delta::ToolArgs(t) | Delta::Thinking(t),
            ..
        } => meter.output_text(t.chars().count() as u64),
        Event::MessageStop { stop, .. } => meter.stop_reason(*stop),
        Event::Error(_) => meter.upstream_stream_error(),
        _ => {}
    }
}

/// The client's last event for a failure of the gateway's, in the client's dialect.
fn failure_event(
    translator: Option<&mut StreamTranslator>,
    dialect: Dialect,
    e: &ScanError,
) -> Bytes {
    match (translator, dialect) {
        (Some(t), _) => {
            let mut out = Vec::new();
            t.fail(scan_failure(e), &mut out);
            Bytes::from(out)
        }
        (None, Dialect::OpenAiChat) => error_event(e),
        (None, d) => Bytes::from(crate::translate::stream_error(d, &scan_failure(e))),
    }
}

/// A translated stream's error event for a failure of the gateway's (oversized event,
/// timeout).
fn scan_failure(e: &ScanError) -> ApiError {
    ApiError {
        status: 502,
        kind: match e {
            ScanError::EventTooLarge { .. } => ErrorKind::Server,
            ScanError::Idle(_) | ScanError::TooLong(_) => ErrorKind::Timeout,
        },
        message: e.to_string(),
        param: None,
        code: Some(e.code().to_owned()),
    }
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
        Self::with_max_event(upstream, meter, strip_usage, DEFAULT_MAX_EVENT_BYTES)
    }

    /// `max_event`: the largest event held while waiting for its end (see [`SseScanner`]).
    pub fn with_max_event(
        upstream: UpstreamBody,
        meter: Meter,
        strip_usage: bool,
        max_event: usize,
    ) -> Self {
        Self::with_limits(upstream, meter, strip_usage, max_event, None, None)
    }

    /// Also end the stream (with an error event, metered) after `idle` without an upstream
    /// frame, or `total` after it began.
    pub fn with_limits(
        upstream: UpstreamBody,
        meter: Meter,
        strip_usage: bool,
        max_event: usize,
        idle: Option<Duration>,
        total: Option<Duration>,
    ) -> Self {
        let timer = |d: Duration| (d, Box::pin(tokio::time::sleep(d)));
        Self {
            idle: idle.map(timer),
            deadline: total.map(timer),
            failure_kind: UpstreamErrorKind::Stream,
            upstream,
            first: None,
            scanner: SseScanner::new(strip_usage, max_event),
            meter: Some(meter),
            upstream_done: false,
            failed: None,
            held: Gather::default(),
            turn: None,
            turns: 0,
            fresh: false,
            translator: None,
            watcher: None,
            dialect: Dialect::OpenAiChat,
        }
    }

    /// Forward the upstream's events as they came, read for metering by `watcher` (a
    /// dialect the OpenAI scanner does not read).
    pub fn watching(mut self, watcher: Box<StreamWatcher>) -> Self {
        self.scanner = SseScanner::watching(self.scanner.lines.max_event);
        self.dialect = watcher.dialect();
        self.watcher = Some(watcher);
        self
    }

    /// Drop Azure OpenAI's filter-only chunks ([`SseScanner::with_azure_filter`]).
    pub fn azure_filtered(mut self) -> Self {
        let scanner = std::mem::replace(&mut self.scanner, SseScanner::new(false, 0));
        self.scanner = scanner.with_azure_filter();
        self
    }

    /// Translate the upstream's events instead of forwarding them.
    pub fn translating(mut self, translator: Box<StreamTranslator>) -> Self {
        self.scanner = SseScanner::delivering(self.scanner.lines.max_event);
        self.translator = Some(translator);
        self
    }

    /// Begin with `first`, the upstream's first bytes (read by [`first_bytes`] before the
    /// response was committed), and count the total limit from `since`, when the upstream's
    /// headers came: the wait for those bytes is part of the stream's time.
    pub fn starting_with(mut self, first: Option<Bytes>, since: std::time::Instant) -> Self {
        self.first = first;
        if let Some((d, sleep)) = &mut self.deadline {
            let at = tokio::time::Instant::from_std(since);
            if let Some(end) = at.checked_add(*d) {
                sleep.as_mut().reset(end);
            }
        }
        self
    }
}

/// Has this timer run out? (Polling it also arms its wake-up.)
fn fired(
    timer: &mut Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    cx: &mut Context<'_>,
) -> Option<Duration> {
    let (d, sleep) = timer.as_mut()?;
    sleep.as_mut().poll(cx).is_ready().then_some(*d)
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
                m.finish_stream(Some(this.failure_kind));
            }
            return Poll::Ready(Some(Err(e)));
        }
        let Some(meter) = this.meter.as_mut() else {
            return Poll::Ready(None);
        };
        // Gather what the upstream has ready.
        while !this.upstream_done && this.failed.is_none() && this.held.len() < COALESCE_LIMIT {
            let polled = match this.first.take() {
                Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
                None => Pin::new(&mut this.upstream).poll_frame(cx),
            };
            match polled {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => {
                    this.fresh = true;
                    if let Some((d, t)) = this.idle.as_mut() {
                        t.as_mut().reset(tokio::time::Instant::now() + *d);
                    }
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let held = &mut this.held;
                    let scanned = match (
                        this.translator.as_deref_mut(),
                        this.watcher.as_deref_mut(),
                    ) {
                        (None, None) => this.scanner.feed(data, meter, |b| held.push(b)),
                        (None, Some(watcher)) => {
                            let mut w = Watching {
                                meter: &mut *meter,
                                watcher,
                            };
                            this.scanner.feed(data, &mut w, |b| held.push(b))
                        }
                        (Some(translator), _) => {
                            let mut t = Translating {
                                meter: &mut *meter,
                                translator,
                                out: Vec::new(),
                                failed: None,
                            };
                            let scanned = if t.translator.binary() {
                                // AWS's event stream: the translator splits its messages.
                                if let Err(e) = t
                                    .translator
                                    .bytes(&data, &mut t.out, |e| meter_event(t.meter, e))
                                {
                                    t.failed = Some(e);
                                }
                                Ok(())
                            } else {
                                this.scanner.feed(data, &mut t, |_| {})
                            };
                            if !t.out.is_empty() {
                                held.push(Bytes::from(t.out));
                            }
                            if let Some(e) = t.failed {
                                tracing::warn!(request_id = %meter.request_id, error = %e, "stream ended");
                                this.failure_kind = UpstreamErrorKind::Stream;
                                this.failed = Some(e.into());
                            }
                            scanned
                        }
                    };
                    if let Err(e) = scanned {
                        tracing::warn!(request_id = %meter.request_id, error = %e, "stream ended");
                        // Tell the client in the stream's own terms before the body fails.
                        let last = failure_event(this.translator.as_deref_mut(), this.dialect, &e);
                        this.held.push(last);
                        this.failure_kind = e.metric_kind();
                        this.failed = Some(e.into());
                    }
                }
                Poll::Ready(Some(Err(e))) => this.failed = Some(e),
                Poll::Ready(None) => this.upstream_done = true,
            }
        }
        // A silent or endless upstream: the timers were polled (and will wake this task).
        if !this.upstream_done && this.failed.is_none() {
            let timeout = fired(&mut this.deadline, cx)
                .map(ScanError::TooLong)
                .or_else(|| fired(&mut this.idle, cx).map(ScanError::Idle));
            if let Some(e) = timeout {
                tracing::warn!(request_id = %meter.request_id, error = %e, "stream ended");
                let last = failure_event(this.translator.as_deref_mut(), this.dialect, &e);
                this.held.push(last);
                this.failure_kind = e.metric_kind();
                this.failed = Some(e.into());
            }
        }
        if this.held.is_empty()
            && let Some(e) = this.failed.take()
        {
            if let Some(m) = this.meter.take() {
                m.finish_stream(Some(this.failure_kind));
            }
            return Poll::Ready(Some(Err(e)));
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
            match (this.meter.as_mut(), this.translator.as_deref_mut()) {
                (Some(meter), None) => {
                    let rest = match this.watcher.as_deref_mut() {
                        None => this.scanner.finish(meter),
                        Some(watcher) => this.scanner.finish(&mut Watching { meter, watcher }),
                    };
                    if let Some(rest) = rest {
                        this.held.push(rest);
                    }
                }
                (Some(meter), Some(translator)) => {
                    let mut t = Translating {
                        meter,
                        translator,
                        out: Vec::new(),
                        failed: None,
                    };
                    // An event cut off without its blank line still counts here.
                    if !t.translator.binary() {
                        this.scanner.finish(&mut t);
                    }
                    let Translating {
                        meter,
                        translator,
                        mut out,
                        ..
                    } = t;
                    translator.finish(&mut out, |e| meter_event(meter, e));
                    if !out.is_empty() {
                        this.held.push(Bytes::from(out));
                    }
                }
                (None, _) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `chunks` to a scanner; returns what was forwarded and what was observed.
    fn run(strip: bool, max: usize, chunks: &[&[u8]]) -> (Vec<u8>, Tally, Result<(), String>) {
        run_on(SseScanner::new(strip, max), chunks)
    }

    fn run_on(mut s: SseScanner, chunks: &[&[u8]]) -> (Vec<u8>, Tally, Result<(), String>) {
        let mut tally = Tally::default();
        let mut out = Vec::new();
        for c in chunks {
            let r = s.feed(Bytes::copy_from_slice(c), &mut tally, |b| {
                out.extend_from_slice(&b)
            });
            if let Err(e) = r {
                return (out, tally, Err(e.to_string()));
            }
        }
        if let Some(rest) = s.finish(&mut tally) {
            out.extend_from_slice(&rest);
        }
        (out, tally, Ok(()))
    }

    fn whole(strip: bool, stream: &[u8]) -> (Vec<u8>, Tally) {
        let (out, tally, r) = run(strip, DEFAULT_MAX_EVENT_BYTES, &[stream]);
        r.unwrap();
        (out, tally)
    }

    /// Every split of `stream` into byte-sized chunks gives what the whole stream gives.
    fn byte_by_byte(strip: bool, stream: &[u8]) -> (Vec<u8>, Tally) {
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        let (out, tally, r) = run(strip, DEFAULT_MAX_EVENT_BYTES, &chunks);
        r.unwrap();
        assert_eq!(
            (&out, &tally),
            (&whole(strip, stream).0, &whole(strip, stream).1)
        );
        (out, tally)
    }

    /// `byte_by_byte` for a stream from an Azure backend (its filter chunks dropped).
    fn azure_byte_by_byte(strip: bool, stream: &[u8]) -> (Vec<u8>, Tally) {
        let scanner = || SseScanner::new(strip, DEFAULT_MAX_EVENT_BYTES).with_azure_filter();
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        let (out, tally, r) = run_on(scanner(), &chunks);
        r.unwrap();
        let (whole_out, whole_tally, r) = run_on(scanner(), &[stream]);
        r.unwrap();
        assert_eq!((&out, &tally), (&whole_out, &whole_tally));
        (out, tally)
    }

    const USAGE: Usage = Usage {
        input: Some(7),
        cache_read: None,
        cache_write: None,
        output: Some(3),
        reasoning: None,
    };

    fn compact(eol: &str) -> String {
        [
            r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
            "",
            r#"data: {"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}],"usage":null}"#,
            "",
            r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
            "",
            r#"data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#,
            "",
            "data: [DONE]",
            "",
            "",
        ]
        .join(eol)
    }

    #[test]
    fn every_line_ending_of_the_spec() {
        for eol in ["\n", "\r\n", "\r"] {
            let stream = compact(eol);
            let (out, t) = byte_by_byte(false, stream.as_bytes());
            assert_eq!(out, stream.as_bytes(), "{eol:?}: passed through as is");
            assert_eq!(t.usage, Some(USAGE), "{eol:?}");
            assert_eq!(t.output_chars, 5, "{eol:?}");
            assert_eq!(t.finish_reason.as_deref(), Some("stop"), "{eol:?}");

            let (out, t) = byte_by_byte(true, stream.as_bytes());
            let kept = String::from_utf8(out).unwrap();
            assert!(
                !kept.contains("prompt_tokens"),
                "{eol:?}: usage stripped: {kept:?}"
            );
            assert!(
                kept.ends_with(&format!("data: [DONE]{eol}{eol}")),
                "{kept:?}"
            );
            assert_eq!(t.usage, Some(USAGE), "still metered");
        }
    }

    #[test]
    fn mixed_line_endings() {
        let stream = "data: {\"text\":\"ab\"}\r\n\r\ndata: {\"text\":\"cd\"}\r\rdata: {\"text\":\"e\"}\n\r\n: c\r\n\n";
        let (out, t) = byte_by_byte(false, stream.as_bytes());
        assert_eq!(out, stream.as_bytes());
        assert_eq!(t.output_chars, 5);
    }

    #[test]
    fn any_json_formatting_and_key_order() {
        let stream = concat!(
            "data: {\"usage\" : null, \"choices\" :\t[ { \"finish_reason\" : null , \"delta\" : { \"content\" : \"Hi\" } } ] }\n\n",
            "data:{\"choices\": [{\"delta\": {}, \"finish_reason\": \"length\"}]}\n\n",
            "data: { \"usage\": {\"completion_tokens\": 3, \"prompt_tokens\": 7}, \"choices\": [ ] }\n\n",
        );
        let (out, t) = byte_by_byte(false, stream.as_bytes());
        assert_eq!(out, stream.as_bytes());
        assert_eq!(t.usage, Some(USAGE));
        assert_eq!(t.output_chars, 2);
        assert_eq!(t.finish_reason.as_deref(), Some("length"));
        let (out, _) = byte_by_byte(true, stream.as_bytes());
        assert_eq!(
            out,
            &stream.as_bytes()[..stream.find("data: { \"usage\"").unwrap()]
        );
    }

    #[test]
    fn pretty_printed_usage_chunk_is_stripped() {
        // Multi-line data: one JSON document spread over `data:` lines.
        let usage_event = "data: {\ndata:   \"choices\": [],\ndata:   \"usage\": {\ndata:     \"prompt_tokens\": 7,\ndata:     \"completion_tokens\": 3\ndata:   }\ndata: }\n\n";
        let stream = format!(
            "data: {{\ndata:   \"choices\": [\ndata:     {{\"delta\": {{\"content\": \"Hi there\"}}}}\ndata:   ]\ndata: }}\n\n{usage_event}data: [DONE]\n\n"
        );
        let (out, t) = byte_by_byte(true, stream.as_bytes());
        assert_eq!(out, stream.replace(usage_event, "").as_bytes());
        assert_eq!(t.usage, Some(USAGE));
        assert_eq!(t.output_chars, 8);
        let (out, _) = byte_by_byte(false, stream.as_bytes());
        assert_eq!(out, stream.as_bytes());
    }

    #[test]
    fn escaped_strings_count_as_text_and_never_read_as_keys() {
        // A content string that mentions usage in JSON syntax is text, not usage.
        let stream = concat!(
            r#"data: {"choices":[{"delta":{"content":"say \"usage\":{\"prompt_tokens\":99} \\"}}],"usage":null}"#,
            "\n\n",
            r#"data: {"choices":[],"x":"\"usage\":{\"prompt_tokens\":1}"}"#,
            "\n\n",
        );
        let (out, t) = byte_by_byte(true, stream.as_bytes());
        assert_eq!(out, stream.as_bytes(), "nothing stripped");
        assert_eq!(t.usage, None);
        let expected: String =
            serde_json::from_str(r#""say \"usage\":{\"prompt_tokens\":99} \\""#).unwrap();
        assert_eq!(t.output_chars, expected.chars().count() as u64);

        // Escaped key names are still the keys they spell.
        let (_, t) = whole(
            false,
            br#"data: {"\u0075sage":{"prompt_tokens":7,"completion_tokens":3},"choices":[{"delta":{"c\u006fntent":"ab"}}]}

"#,
        );
        assert_eq!(t.usage, Some(USAGE));
        assert_eq!(t.output_chars, 2);
    }

    #[test]
    fn characters_are_counted_after_unescaping() {
        for s in [
            "",
            "plain",
            "naïve café",
            "漢字とかな",
            "emoji 😀 and \u{1F680}",
            "quote \" backslash \\ slash / tab \t nl \n",
            "\u{0}\u{1f}\u{7f}",
            "<think>&amp;</think>",
        ] {
            // serde_json's escaping, and Go's (HTML-safe, \uXXXX) and Python's (ASCII-only).
            let serde = serde_json::to_string(s).unwrap();
            let ascii: String = s
                .encode_utf16()
                .map(|u| match u {
                    0x20..=0x7e
                        if u != u16::from(b'"')
                            && u != u16::from(b'\\')
                            && u != u16::from(b'<') =>
                    {
                        char::from(u as u8).to_string()
                    }
                    _ => format!("\\u{u:04x}"),
                })
                .collect();
            for quoted in [serde, format!("\"{ascii}\"")] {
                let back: String = serde_json::from_str(&quoted).unwrap();
                assert_eq!(back, s);
                let raw = &quoted.as_bytes()[1..quoted.len() - 1];
                assert_eq!(json_str_chars(raw), s.chars().count() as u64, "{quoted}");
            }
        }
    }

    #[test]
    fn an_event_cut_off_by_the_end_of_the_stream_is_metered_and_passed_on() {
        for end in ["", "\n", "\r\n", "\r"] {
            let stream = format!(
                "data: {{\"text\":\"ab\"}}\n\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":3}}}}{end}"
            );
            let (out, t) = byte_by_byte(true, stream.as_bytes());
            assert_eq!(out, stream.as_bytes(), "{end:?}");
            assert_eq!(t.usage, Some(USAGE), "{end:?}");
            assert_eq!(t.output_chars, 2, "{end:?}");
        }
    }

    #[test]
    fn reasoning_and_tool_call_arguments_are_output_text() {
        let (_, t) = whole(
            false,
            concat!(
                r#"data: {"choices":[{"delta":{"reasoning_content":"hmm","content":null}}]}"#,
                "\n\n",
                r#"data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}"#,
                "\n\n",
                r#"data: {"choices":[{"delta":{"content":"ok"},"logprobs":{"content":[{"token":"ok","logprob":-0.1}]}}]}"#,
                "\n\n",
            )
            .as_bytes(),
        );
        assert_eq!(
            t.output_chars,
            3 + 7 + 2,
            "function names and logprob tokens are not text"
        );
    }

    #[test]
    fn comments_and_other_fields_pass_through() {
        let stream = concat!(
            ": keep-alive\n\n",
            "event: message\nid: 1\nretry: 1000\ndata: {\"choices\":[{\"text\":\"abc\"}]}\n\n",
            ":comment inside\ndata: {\"choices\":[{\"text\":\"de\"}]}\nid\n\n",
            "data\n\n",
        );
        let (out, t) = byte_by_byte(true, stream.as_bytes());
        assert_eq!(out, stream.as_bytes());
        assert_eq!(t.output_chars, 5);
    }

    #[test]
    fn multi_line_data_joins_with_lf() {
        // Two lines of text: the JSON string spans the joined lines' separator as whitespace.
        let stream = "data: {\"choices\":\ndata: [{\"text\":\"abcd\"}]}\n\n";
        let (out, t) = byte_by_byte(false, stream.as_bytes());
        assert_eq!(out, stream.as_bytes());
        assert_eq!(t.output_chars, 4);
        // One space after the colon is the separator; more is the value's.
        let mut lines = Lines {
            data: Data::None,
            after_cr: AfterCr::No,
            strip_usage: false,
            max_event: 100,
            mode: Mode::Observe,
            azure: false,
        };
        let buf = b"data:  a\ndata:b\ndata\n";
        lines.field(buf, 0, 0, 8);
        lines.field(buf, 0, 9, 15);
        lines.field(buf, 0, 16, 20);
        match &lines.data {
            Data::Joined(d) => assert_eq!(d, b" a\nb\n"),
            _ => panic!("joined"),
        }
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_field() {
        let stream = b"\xEF\xBB\xBFdata: {\"text\":\"ab\"}\n\n";
        let (out, t) = whole(false, stream);
        assert_eq!(out, stream);
        assert_eq!(t.output_chars, 2);
    }

    #[test]
    fn a_byte_order_mark_split_over_the_first_reads_is_still_one() {
        // Found by the sse fuzz target: a BOM cut into 1-byte reads hid the first event.
        let stream = b"\xEF\xBB\xBFdata:\"content\":\" \"\n\n";
        let (_, t) = byte_by_byte(true, stream);
        assert_eq!(t.output_chars, 1);
        for cut in 1..3 {
            let (out, t, r) = run(
                false,
                DEFAULT_MAX_EVENT_BYTES,
                &[&stream[..cut], &stream[cut..]],
            );
            r.unwrap();
            assert_eq!(out, stream);
            assert_eq!(t.output_chars, 1);
        }
        // A stream of nothing but the start of a BOM is forwarded as it came.
        let (out, _, r) = run(false, DEFAULT_MAX_EVENT_BYTES, &[b"\xEF\xBB"]);
        r.unwrap();
        assert_eq!(out, b"\xEF\xBB");
    }

    #[test]
    fn events_split_across_chunks_are_read_once() {
        let stream = compact("\n");
        // Split at every position into two chunks, and three.
        for i in 0..stream.len() {
            let (a, b) = stream.as_bytes().split_at(i);
            let (out, t, r) = run(true, DEFAULT_MAX_EVENT_BYTES, &[a, b]);
            r.unwrap();
            assert_eq!((out, t), whole(true, stream.as_bytes()), "split at {i}");
        }
        // The scan offset moves forward: an event in 1-byte chunks is scanned in linear time.
        let big = format!("data: {{\"text\":\"{}\"}}\n\n", "x".repeat(200_000));
        let (out, t) = byte_by_byte(false, big.as_bytes());
        assert_eq!(out.len(), big.len());
        assert_eq!(t.output_chars, 200_000);
    }

    #[test]
    fn an_event_over_the_limit_ends_the_stream() {
        let ok = "data: {\"text\":\"ab\"}\n\n";
        let big = format!("data: {{\"text\":\"{}\"}}\n\n", "x".repeat(100));
        // Whole in one chunk, and arriving in pieces that never end the event.
        let (out, t, r) = run(false, 64, &[format!("{ok}{big}{ok}").as_bytes()]);
        assert_eq!(
            r.unwrap_err(),
            "upstream sent a server-sent event larger than 64 bytes"
        );
        assert_eq!(out, ok.as_bytes(), "events before the big one still go out");
        assert_eq!(t.output_chars, 2);
        let pieces: Vec<&[u8]> = vec![
            ok.as_bytes(),
            b"data: {\"text\":\"",
            &[b'x'; 40],
            &[b'x'; 40],
        ];
        let (out, _, r) = run(false, 64, &pieces);
        assert!(r.is_err());
        assert_eq!(out, ok.as_bytes());
        // Comment lines without an end count too: nothing grows without bound.
        let comments = vec![&b": ping\n"[..]; 20];
        let (_, _, r) = run(false, 64, &comments);
        assert!(r.is_err());
        // At the limit is fine.
        let exact = format!("data: {{\"text\":\"{}\"}}\n\n", "x".repeat(64 - 19));
        assert_eq!(exact.len(), 64);
        let (out, _, r) = run(false, 64, &[exact.as_bytes()]);
        r.unwrap();
        assert_eq!(out, exact.as_bytes());
    }

    #[test]
    fn usage_with_choices_is_kept_and_nested_usage_is_not_usage() {
        // llama.cpp sends usage on the last choice chunk: metered, never stripped.
        let (out, t) = whole(
            true,
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n",
        );
        assert!(!out.is_empty());
        assert_eq!(t.usage, Some(USAGE));
        let (out, t) = whole(
            true,
            b"data: {\"choices\":[],\"meta\":{\"usage\":{\"prompt_tokens\":1}}}\n\n",
        );
        assert!(!out.is_empty());
        assert_eq!(t.usage, None);
    }

    #[test]
    fn hostile_input_never_panics() {
        for s in [
            &b"data: \"\n\n"[..],
            b"data: {\"content\":\"\\",
            b"data: {\"content\":\"\\u12\"}\n\n",
            b"data: {\"content\":\"\\\n\n",
            b"data: {\"usage\":{\n\n",
            b"data: {\"finish_reason\":\"\\u00\n\n",
            b"data: \"\":\n\n",
            b"\r",
            b"\r\r\n\n\r",
            b"data:",
        ] {
            let _ = byte_by_byte(true, s);
        }
    }

    #[tokio::test]
    async fn metered_stream_ends_with_an_error_event_past_the_limit() {
        use http_body_util::BodyExt;
        let ok = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        let big = Bytes::from(format!("data: {{\"x\":\"{}\"}}\n\n", "y".repeat(300)));
        let upstream = UpstreamBody::Mock(MockStream::new(
            vec![ok.clone(), big.slice(..150), big.slice(150..), ok.clone()],
            Duration::ZERO,
        ));
        let meter = Meter::new(Arc::new(crate::metrics::Metrics::new()), "r".into());
        let mut body = MeteredStream::with_max_event(upstream, meter, true, 256);
        let mut got = Vec::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => got.extend_from_slice(f.data_ref().unwrap()),
                Some(Err(e)) => break e,
                None => panic!("the stream must fail"),
            }
        };
        assert!(err.to_string().contains("larger than 256 bytes"), "{err}");
        let text = String::from_utf8(got).unwrap();
        let (first, last) = text.split_at(ok.len());
        assert_eq!(first.as_bytes(), &ok[..]);
        let event: serde_json::Value =
            serde_json::from_str(last.strip_prefix("data: ").unwrap().trim_end()).unwrap();
        assert_eq!(event["error"]["code"], "upstream_event_too_large");
        assert!(body.frame().await.is_none(), "nothing after the error");
    }

    /// Drive a stream to its end; returns (bytes, error).
    async fn drain(mut body: MeteredStream) -> (String, Option<BoxError>) {
        use http_body_util::BodyExt;
        let mut got = Vec::new();
        loop {
            match body.frame().await {
                Some(Ok(f)) => got.extend_from_slice(f.data_ref().unwrap()),
                Some(Err(e)) => return (String::from_utf8(got).unwrap(), Some(e)),
                None => return (String::from_utf8(got).unwrap(), None),
            }
        }
    }

    #[tokio::test]
    async fn a_silent_or_endless_upstream_ends_the_stream_with_an_error_event() {
        let ok = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        // Silent: the second event would come after an hour.
        let silent = UpstreamBody::Mock(MockStream::new(
            vec![ok.clone(), ok.clone()],
            Duration::from_secs(3600),
        ));
        let meter = Meter::new(metrics.clone(), "idle".into());
        let (text, err) = drain(MeteredStream::with_limits(
            silent,
            meter,
            false,
            DEFAULT_MAX_EVENT_BYTES,
            Some(Duration::from_millis(100)),
            None,
        ))
        .await;
        assert!(err.unwrap().to_string().contains("streamIdleTimeout"));
        assert!(
            text.starts_with(std::str::from_utf8(&ok).unwrap()),
            "{text}"
        );
        assert!(text.contains("\"code\":\"upstream_timeout\""), "{text}");

        // Endless: lively, but past the total limit.
        let lively = UpstreamBody::Mock(MockStream::new(
            vec![ok.clone(); 10_000],
            Duration::from_millis(5),
        ));
        let meter = Meter::new(metrics.clone(), "total".into());
        let (text, err) = drain(MeteredStream::with_limits(
            lively,
            meter,
            false,
            DEFAULT_MAX_EVENT_BYTES,
            Some(Duration::from_secs(60)),
            Some(Duration::from_millis(200)),
        ))
        .await;
        assert!(err.unwrap().to_string().contains("streamTimeout"));
        assert!(text.contains("upstream_timeout"), "{text}");
        assert!(
            text.matches("content").count() >= 1,
            "events before the end went out"
        );
    }

    #[tokio::test]
    async fn bytes_read_before_the_headers_went_out_lead_the_stream() {
        let ok = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        let mut upstream = UpstreamBody::Mock(MockStream::new(
            vec![Bytes::new(), ok.clone(), ok.clone()],
            Duration::ZERO,
        ));
        let first = first_bytes(&mut upstream).await.unwrap();
        assert_eq!(first.as_ref(), Some(&ok), "empty frames are passed over");
        let meter = Meter::new(Arc::new(crate::metrics::Metrics::new()), "first".into());
        let body = MeteredStream::new(upstream, meter, false)
            .starting_with(first, std::time::Instant::now());
        let (text, err) = drain(body).await;
        assert!(err.is_none());
        assert_eq!(text.as_bytes(), [&ok[..], &ok[..]].concat());

        let mut ended = UpstreamBody::Mock(MockStream::new(Vec::new(), Duration::ZERO));
        assert!(first_bytes(&mut ended).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_total_limit_counts_from_the_upstreams_headers() {
        let ok = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        let lively = UpstreamBody::Mock(MockStream::new(
            vec![ok.clone(); 10_000],
            Duration::from_millis(5),
        ));
        let meter = Meter::new(Arc::new(crate::metrics::Metrics::new()), "since".into());
        // The headers came a minute ago, as long as the stream may last.
        let since = std::time::Instant::now()
            .checked_sub(Duration::from_secs(60))
            .unwrap();
        let body = MeteredStream::with_limits(
            lively,
            meter,
            false,
            DEFAULT_MAX_EVENT_BYTES,
            None,
            Some(Duration::from_secs(60)),
        )
        .starting_with(Some(ok.clone()), since);
        let (text, err) = drain(body).await;
        assert!(err.unwrap().to_string().contains("streamTimeout"));
        assert!(
            text.starts_with(std::str::from_utf8(&ok).unwrap()),
            "{text}"
        );
        assert!(text.contains("upstream_timeout"), "{text}");
    }

    /// The events of a `\n\n`-separated stream, those `drop` picks left out.
    fn without(stream: &str, drop: impl Fn(&str) -> bool) -> String {
        stream
            .split_inclusive("\n\n")
            .filter(|e| !drop(e))
            .collect()
    }

    const AZURE_ASYNC: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/providers/openai/streams/azure_async_filter.sse"
    ));
    const AZURE_BLOCKED: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/providers/openai/streams/azure_blocked.sse"
    ));

    #[test]
    fn azure_prompt_filter_and_annotation_chunks_are_dropped_whole() {
        for strip in [false, true] {
            let (out, t) = azure_byte_by_byte(strip, AZURE_ASYNC.as_bytes());
            let out = String::from_utf8(out).unwrap();
            // Azure writes `"id":""` on exactly its filter chunks here.
            assert_eq!(out, without(AZURE_ASYNC, |e| e.contains(r#""id":"""#)));
            assert!(!out.contains("prompt_annotations"), "{out}");
            assert!(!out.contains("content_filter_offsets"), "{out}");
            assert!(out.contains(r#""delta":{"content":"Color"}"#), "{out}");
            assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
            assert_eq!(t.output_chars, "Color is a".chars().count() as u64);
            assert_eq!(t.finish_reason.as_deref(), Some("stop"));
            // From any other backend, nothing is second-guessed: every chunk goes on.
            let (out, _) = byte_by_byte(strip, AZURE_ASYNC.as_bytes());
            assert_eq!(out, AZURE_ASYNC.as_bytes());
        }
    }

    #[test]
    fn an_azure_content_filter_finish_is_kept_without_a_delta() {
        let (out, t) = azure_byte_by_byte(false, AZURE_BLOCKED.as_bytes());
        let out = String::from_utf8(out).unwrap();
        let dropped = |e: &str| e.contains(r#""id":"""#) && !e.contains("\"content_filter\"");
        assert_eq!(out, without(AZURE_BLOCKED, dropped));
        assert!(!out.contains("prompt_filter_results"), "{out}");
        assert_eq!(
            out.matches(r#""finish_reason":"content_filter""#).count(),
            1,
            "{out}"
        );
        assert_eq!(out.matches("content_filter_offsets").count(), 1, "{out}");
        assert_eq!(t.finish_reason.as_deref(), Some("content_filter"));
        assert_eq!(t.output_chars, "Hey Jude, better".chars().count() as u64);
    }

    #[test]
    fn azure_filter_chunks_in_any_formatting_and_with_a_usage_object() {
        // Pretty-printed over several data lines, keys in another order.
        let prompt = "data: {\ndata:   \"choices\" : [ ],\ndata:   \"prompt_filter_results\": [{\"prompt_index\": 0, \"content_filter_results\": {}}],\ndata:   \"usage\": null\ndata: }\n\n";
        let annotation = "data: {\"choices\": [ {\"content_filter_results\": {\"hate\": {\"filtered\": false, \"severity\": \"safe\"}}, \"finish_reason\" : null, \"index\": 0} ]}\n\n";
        let content = "data: {\"choices\":[{\"index\":0,\"content_filter_results\":{},\"delta\":{\"content\":\"ok\"},\"finish_reason\":null}]}\n\n";
        let stream = format!("{prompt}{content}{annotation}data: [DONE]\n\n");
        let (out, t) = azure_byte_by_byte(false, stream.as_bytes());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{content}data: [DONE]\n\n")
        );
        assert_eq!(t.output_chars, 2);

        // Azure's usage chunk (empty choices, a usage object) is metered and, as OpenAI's,
        // stripped only when the client did not ask for it.
        let usage = "data: {\"choices\":[],\"prompt_filter_results\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n";
        let (out, t) = azure_byte_by_byte(false, usage.as_bytes());
        assert_eq!(out, usage.as_bytes());
        assert_eq!(t.usage, Some(USAGE));
        let (out, _) = azure_byte_by_byte(true, usage.as_bytes());
        assert!(out.is_empty());
    }

    #[test]
    fn chunks_that_only_resemble_azure_filter_chunks_are_forwarded() {
        let stream = concat!(
            // Completions: choices carry `text`, never `delta`.
            "data: {\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"hi\",\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"\",\"content_filter_results\":{},\"finish_reason\":null}]}\n\n",
            // No choices, but no prompt-filter results either.
            "data: {\"id\":\"x\",\"choices\":[],\"usage\":null}\n\n",
            // An error rides on what looks like an annotation.
            "data: {\"choices\":[{\"index\":0,\"finish_reason\":null}],\"error\":{\"message\":\"boom\"}}\n\n",
            "data: {\"choices\":[],\"prompt_filter_results\":[],\"error\":{\"message\":\"boom\"}}\n\n",
            // Logprobs without a delta.
            "data: {\"choices\":[{\"index\":0,\"finish_reason\":null,\"logprobs\":{\"content\":[]}}]}\n\n",
            // Not JSON the scanner can read as a chunk.
            "data: {\"choices\":[{\"index\":0}\n\n",
            "data: [DONE]\n\n",
        );
        let (out, t) = azure_byte_by_byte(false, stream.as_bytes());
        assert_eq!(String::from_utf8(out).unwrap(), stream);
        assert_eq!(t.output_chars, 2);
        // Two choices, one of them an annotation: the chunk carries content, so it goes on.
        let mixed = "data: {\"choices\":[{\"index\":0,\"content_filter_results\":{}},{\"index\":1,\"delta\":{\"content\":\"b\"}}]}\n\n";
        assert_eq!(whole(false, mixed.as_bytes()).0, mixed.as_bytes());
    }
}
