//! Translators between the dialects clients speak, the APIs backends speak, and the
//! canonical model (`canonical`). Same dialect on both sides never comes here: the body passes
//! through with the model spliced (`request.rs`, `stream.rs`).
//!
//! ```text
//!  OpenAI chat body ─► openai_chat::request_in ─┐            ┌► anthropic::request_out ─► Anthropic body
//!  Anthropic body ──► anthropic::request_in ───┴► Request ──┴► openai_chat::request_out ─► OpenAI body
//!  answers, streams and errors come back the same way: *_in to canonical, *_out from it
//! ```
//!
//! Every function is pure, bytes to bytes: no sockets, clocks, config lookups or
//! credentials; what a translator needs (the upstream model, the `max_tokens` to send) is
//! passed in. Streams are translated event by event with bounded state, never buffered whole.

pub mod anthropic;
pub mod bedrock;
pub mod gemini;
pub mod openai_chat;
pub mod openai_responses;

/// A request body that cannot be read, or that asks for what the target cannot express.
/// Answered with 400 in the client's dialect, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// The offending field, as the client spelled it (`n`, `logprobs`, `messages`...).
    pub param: Option<&'static str>,
    pub message: String,
}

impl Refused {
    pub fn new(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary: how much upstream text an error
/// message may carry.
pub(crate) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// An error answer (any status) from a backend of `dialect`, read into the canonical model.
/// `headers`: the answer's (Bedrock names the error in `x-amzn-ErrorType`).
pub fn error_in(dialect: Dialect, status: u16, headers: &http::HeaderMap, body: &[u8]) -> ApiError {
    match dialect {
        Dialect::OpenAiChat => openai_chat::error_in(status, body),
        Dialect::Anthropic => anthropic::error_in(status, body),
        Dialect::OpenAiResponses => openai_responses::error_in(status, body),
        Dialect::Bedrock => {
            let kind = headers
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok());
            bedrock::error_in(status, kind, body)
        }
        Dialect::Gemini => gemini::error_in(status, body),
    }
}

/// A 2xx answer from a backend of `dialect`, read into the canonical model. `id`: the
/// gateway's request id, for the APIs whose answers carry none.
pub fn response_in(dialect: Dialect, body: &[u8], id: &str) -> Result<Response, String> {
    match dialect {
        Dialect::OpenAiChat => openai_chat::response_in(body),
        Dialect::Anthropic => anthropic::response_in(body),
        Dialect::OpenAiResponses => openai_responses::response_in(body),
        Dialect::Bedrock => bedrock::response_in(body, id),
        Dialect::Gemini => gemini::response_in(body, id),
    }
}

/// A canonical answer in a client's dialect. `model`: the client's public name.
pub fn response_out(to: Dialect, resp: &Response, model: &str, created: u64) -> Vec<u8> {
    match to {
        Dialect::Anthropic => anthropic::response_out(resp, model),
        Dialect::OpenAiResponses => openai_responses::response_out(resp, model, created),
        // No client speaks the backend-only APIs.
        Dialect::OpenAiChat | Dialect::Bedrock | Dialect::Gemini => {
            openai_chat::response_out(resp, model, created)
        }
    }
}

/// A canonical error in a client's dialect.
pub fn error_out(to: Dialect, err: &ApiError, request_id: &str) -> Vec<u8> {
    match to {
        Dialect::Anthropic => anthropic::error_out(err, request_id),
        Dialect::OpenAiResponses => openai_responses::error_out(err),
        Dialect::OpenAiChat | Dialect::Bedrock | Dialect::Gemini => openai_chat::error_out(err),
    }
}

/// Most tool calls one streamed answer may open; past it the stream ends with an error.
pub const MAX_STREAM_TOOL_CALLS: usize = 128;

use crate::canonical::{ApiError, BlockKind, Delta, ErrorKind, Event, Response};

/// The API of a request's client or of a backend. Clients speak the first three;
/// Bedrock's Converse and Gemini's generateContent are spoken only by backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAiChat,
    Anthropic,
    OpenAiResponses,
    Bedrock,
    Gemini,
}

impl Dialect {
    /// The API whose opaque values (signatures) this dialect's backends issue.
    pub fn api(self) -> crate::canonical::Api {
        use crate::canonical::Api;
        match self {
            Self::OpenAiChat => Api::OpenAiChat,
            Self::Anthropic => Api::AnthropicMessages,
            Self::OpenAiResponses => Api::OpenAiResponses,
            Self::Bedrock => Api::BedrockConverse,
            Self::Gemini => Api::Gemini,
        }
    }

    /// Whether the backend's stream is AWS's binary event stream rather than SSE.
    pub fn binary_stream(self) -> bool {
        self == Self::Bedrock
    }
}

/// Largest message of a binary (Bedrock) event stream; AWS's own limit is 16 MiB, a
/// ConverseStream event is a few hundred bytes.
pub const MAX_BINARY_MESSAGE: usize = 1 << 20;

/// Reads a backend's stream into canonical events.
#[derive(Debug)]
enum EventsIn {
    OpenAiChat(openai_chat::EventsIn),
    Anthropic(anthropic::EventsIn),
    OpenAiResponses(openai_responses::EventsIn),
    Bedrock(Box<(bedrock::FrameDecoder, bedrock::EventsIn)>),
    Gemini(gemini::EventsIn),
}

impl EventsIn {
    fn new(from: Dialect, id: &str) -> Self {
        match from {
            Dialect::OpenAiChat => Self::OpenAiChat(openai_chat::EventsIn::new()),
            Dialect::Anthropic => Self::Anthropic(anthropic::EventsIn::new()),
            Dialect::OpenAiResponses => Self::OpenAiResponses(openai_responses::EventsIn::new()),
            Dialect::Bedrock => Self::Bedrock(Box::new((
                bedrock::FrameDecoder::new(MAX_BINARY_MESSAGE),
                bedrock::EventsIn::new(id),
            ))),
            Dialect::Gemini => Self::Gemini(gemini::EventsIn::new(id)),
        }
    }

    /// One SSE event's data.
    fn event(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        match self {
            Self::OpenAiChat(r) => r.event(data, out),
            Self::Anthropic(r) => r.event(data, out),
            Self::OpenAiResponses(r) => r.event(data, out),
            Self::Gemini(r) => r.event(data, out),
            Self::Bedrock(_) => Err("a binary event stream has no text events".into()),
        }
    }

    /// Bytes of a binary event stream, at any boundary.
    fn bytes(&mut self, chunk: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        match self {
            Self::Bedrock(b) => {
                let (frames, reader) = &mut **b;
                frames.push(chunk);
                while let Some(frame) = frames.next_frame()? {
                    reader.event(&frame, out)?;
                }
                Ok(())
            }
            _ => Err("a text event stream is read event by event".into()),
        }
    }

    fn finish(&mut self, out: &mut Vec<Event>) {
        match self {
            Self::OpenAiChat(r) => r.finish(out),
            Self::Anthropic(r) => r.finish(out),
            Self::OpenAiResponses(r) => r.finish(out),
            Self::Bedrock(b) => b.1.finish(out),
            Self::Gemini(r) => r.finish(out),
        }
    }
}

/// Writes canonical events in a client's dialect.
#[derive(Debug)]
enum EventsOut {
    OpenAiChat(openai_chat::EventsOut),
    Anthropic(anthropic::EventsOut),
    OpenAiResponses(Box<openai_responses::EventsOut>),
}

impl EventsOut {
    /// `from`: the backend's API, whose signatures the events carry.
    fn new(to: Dialect, from: Dialect, model: &str, created: u64, include_usage: bool) -> Self {
        match to {
            Dialect::Anthropic => Self::Anthropic(anthropic::EventsOut::new(model)),
            Dialect::OpenAiResponses => Self::OpenAiResponses(Box::new(
                openai_responses::EventsOut::new(model, created).signatures_from(from.api()),
            )),
            // No client speaks the backend-only APIs.
            Dialect::OpenAiChat | Dialect::Bedrock | Dialect::Gemini => {
                Self::OpenAiChat(openai_chat::EventsOut::new(model, created, include_usage))
            }
        }
    }

    fn event(&mut self, e: &Event, out: &mut Vec<u8>) {
        match self {
            Self::OpenAiChat(w) => w.event(e, out),
            Self::Anthropic(w) => w.event(e, out),
            Self::OpenAiResponses(w) => w.event(e, out),
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        match self {
            Self::OpenAiChat(w) => w.finish(out),
            Self::Anthropic(w) => w.finish(out),
            Self::OpenAiResponses(w) => w.finish(out),
        }
    }
}

/// One translated stream: upstream events in one dialect, client events in another, with
/// the canonical events in between shown to the meter. State is bounded by the translators'.
#[derive(Debug)]
pub struct StreamTranslator {
    input: EventsIn,
    output: EventsOut,
    events: Vec<Event>,
    /// A last event (stop or error) was written: nothing more goes to the client.
    over: bool,
}

impl StreamTranslator {
    /// `model`: the client's public name; `include_usage`: the client asked for a usage
    /// chunk (OpenAI clients); `id`: the gateway's request id, the answer's id where the
    /// backend's stream names none.
    pub fn new(
        from: Dialect,
        to: Dialect,
        model: &str,
        created: u64,
        include_usage: bool,
        id: &str,
    ) -> Self {
        Self {
            input: EventsIn::new(from, id),
            output: EventsOut::new(to, from, model, created, include_usage),
            events: Vec::new(),
            over: false,
        }
    }

    /// One upstream event's data: the client's bytes for it are appended to `out`, and each
    /// canonical event is shown to `seen`. An event that cannot be read ends the stream with
    /// an error event (written here) and is reported as `Err`.
    pub fn event(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        seen: impl FnMut(&Event),
    ) -> Result<(), String> {
        if self.over {
            return Ok(());
        }
        let read = self.input.event(data, &mut self.events);
        self.after_read(read, out, seen)
    }

    /// Whether the upstream's stream is binary: fed to [`Self::bytes`], not [`Self::event`].
    pub fn binary(&self) -> bool {
        matches!(self.input, EventsIn::Bedrock(_))
    }

    /// Bytes of a binary upstream stream (`Dialect::binary_stream`), at any boundary: as
    /// [`Self::event`] for each whole message in them.
    pub fn bytes(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<u8>,
        seen: impl FnMut(&Event),
    ) -> Result<(), String> {
        if self.over {
            return Ok(());
        }
        let read = self.input.bytes(chunk, &mut self.events);
        self.after_read(read, out, seen)
    }

    fn after_read(
        &mut self,
        read: Result<(), String>,
        out: &mut Vec<u8>,
        seen: impl FnMut(&Event),
    ) -> Result<(), String> {
        self.write(out, seen);
        if let Err(e) = &read {
            self.fail(
                ApiError {
                    status: 502,
                    kind: ErrorKind::Server,
                    message: format!(
                        "the upstream sent a stream event the gateway cannot read: {e}"
                    ),
                    param: None,
                    code: Some("upstream_protocol_error".into()),
                },
                out,
            );
        }
        read
    }

    /// The upstream body ended: what closes the client's stream is appended.
    pub fn finish(&mut self, out: &mut Vec<u8>, seen: impl FnMut(&Event)) {
        if !self.over {
            self.input.finish(&mut self.events);
            self.write(out, seen);
        }
        self.output.finish(out);
    }

    /// The stream fails for a reason of the gateway's (an oversized event, a timeout): the
    /// client gets `err` as its last event.
    pub fn fail(&mut self, err: ApiError, out: &mut Vec<u8>) {
        if self.over {
            return;
        }
        self.over = true;
        self.output.event(&Event::Error(err), out);
        self.output.finish(out);
    }

    fn write(&mut self, out: &mut Vec<u8>, mut seen: impl FnMut(&Event)) {
        for e in self.events.drain(..) {
            if self.over {
                break;
            }
            seen(&e);
            self.output.event(&e, out);
            self.over = matches!(e, Event::MessageStop { .. } | Event::Error(_));
        }
        self.events.clear();
    }
}

/// The events of a whole answer, for a client that asked for a stream.
pub fn events_of(resp: &Response) -> Vec<Event> {
    let mut events = vec![Event::MessageStart {
        id: resp.id.clone(),
        usage: crate::canonical::Usage::default(),
    }];
    let mut index = 0u32;
    for block in &resp.content {
        let (kind, deltas) = match block {
            crate::canonical::Block::Text(t) => {
                (BlockKind::Text, vec![Delta::Text(t.text.clone())])
            }
            crate::canonical::Block::Thinking { text, signature } => {
                let mut d = vec![Delta::Thinking(text.clone())];
                if let Some(s) = signature {
                    d.push(Delta::Signature(s.value.clone()));
                }
                (BlockKind::Thinking, d)
            }
            crate::canonical::Block::RedactedThinking { data } => (
                BlockKind::RedactedThinking {
                    data: data.value.clone(),
                },
                Vec::new(),
            ),
            crate::canonical::Block::ToolUse {
                id, name, input, ..
            } => (
                BlockKind::ToolUse {
                    id: id.clone(),
                    name: name.clone(),
                },
                vec![Delta::ToolArgs(input.get().to_owned())],
            ),
            // Answers carry no other blocks.
            _ => continue,
        };
        events.push(Event::BlockStart { index, kind });
        events.extend(
            deltas
                .into_iter()
                .map(|delta| Event::BlockDelta { index, delta }),
        );
        events.push(Event::BlockStop { index });
        index += 1;
    }
    events.push(Event::Usage(resp.usage));
    events.push(Event::MessageStop {
        stop: resp.stop,
        stop_sequence: resp.stop_sequence.clone(),
    });
    events
}

/// A whole answer written as a stream in `to`'s dialect.
pub fn stream_of(
    resp: &Response,
    from: Dialect,
    to: Dialect,
    model: &str,
    created: u64,
    include_usage: bool,
) -> Vec<u8> {
    let mut w = EventsOut::new(to, from, model, created, include_usage);
    let mut out = Vec::new();
    for e in events_of(resp) {
        w.event(&e, &mut out);
    }
    w.finish(&mut out);
    out
}

/// Reads a stream passed through unchanged in a dialect the OpenAI scanner does not know
/// (Anthropic to an Anthropic client), for the meter only.
#[derive(Debug)]
pub struct StreamWatcher {
    input: EventsIn,
    events: Vec<Event>,
    dialect: Dialect,
}

impl StreamWatcher {
    pub fn new(dialect: Dialect) -> Self {
        Self {
            input: EventsIn::new(dialect, ""),
            events: Vec::new(),
            dialect,
        }
    }

    /// The stream's (and its client's) dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// One event's data; each canonical event it makes is shown to `seen`. An event that
    /// cannot be read is the client's to see (it passes through); it is not metered.
    pub fn event(&mut self, data: &[u8], mut seen: impl FnMut(&Event)) {
        let _ = self.input.event(data, &mut self.events);
        for e in self.events.drain(..) {
            seen(&e);
        }
    }
}

/// A failure of the gateway's, as the last event of a stream in `dialect`.
pub fn stream_error(dialect: Dialect, err: &ApiError) -> Vec<u8> {
    let mut w = EventsOut::new(dialect, dialect, "", 0, false);
    let mut out = Vec::new();
    w.event(&Event::Error(err.clone()), &mut out);
    out
}

#[cfg(test)]
mod bench {
    //! Timing loops, run by hand in release:
    //! `cargo test -p modelgate-dataplane --release --lib translate::bench -- --ignored --nocapture`.
    //! The streams are those of `tests/src/bin/bench.rs`'s translate rows: eight text pieces,
    //! a stop and the usage, translated for an OpenAI chat client. `MODELGATE_ROUNDS` sets the
    //! rounds (default 100,000); under `valgrind --tool=callgrind` a few thousand give
    //! instruction counts that a busy machine does not change.

    use std::hint::black_box;

    use super::*;

    const PIECES: [&str; 8] = [
        "The sea ",
        "keeps its ",
        "own time: ",
        "each tide ",
        "gives back ",
        "what the ",
        "last one ",
        "took.",
    ];

    fn bedrock_stream() -> Vec<u8> {
        let frame = |kind: &str, payload: serde_json::Value| {
            bedrock::encode_frame("event", kind, payload.to_string().as_bytes())
        };
        let mut b = frame("messageStart", serde_json::json!({"role": "assistant"}));
        for p in PIECES {
            b.extend(frame(
                "contentBlockDelta",
                serde_json::json!({"contentBlockIndex": 0, "delta": {"text": p}}),
            ));
        }
        b.extend(frame(
            "contentBlockStop",
            serde_json::json!({"contentBlockIndex": 0}),
        ));
        b.extend(frame(
            "messageStop",
            serde_json::json!({"stopReason": "end_turn"}),
        ));
        b.extend(frame("metadata", serde_json::json!({"usage": {"inputTokens": 27, "outputTokens": 16, "totalTokens": 43}, "metrics": {"latencyMs": 100}})));
        b
    }

    fn anthropic_events() -> Vec<Vec<u8>> {
        let mut e = vec![
            serde_json::json!({"type": "message_start", "message": {"id": "msg_bench", "type": "message", "role": "assistant", "content": [], "model": "bench", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 27, "output_tokens": 1}}}),
            serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ];
        for p in PIECES {
            e.push(serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}));
        }
        e.push(serde_json::json!({"type": "content_block_stop", "index": 0}));
        e.push(serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 16}}));
        e.push(serde_json::json!({"type": "message_stop"}));
        e.into_iter().map(|v| v.to_string().into_bytes()).collect()
    }

    /// One whole stream from `from` translated for an OpenAI client: `feed` hands it over.
    fn translated(from: Dialect, feed: &dyn Fn(&mut StreamTranslator, &mut Vec<u8>)) {
        let mut t = StreamTranslator::new(
            from,
            Dialect::OpenAiChat,
            "bench",
            1_700_000_000,
            true,
            "req-1",
        );
        let mut out = Vec::new();
        feed(&mut t, &mut out);
        t.finish(&mut out, |e| {
            black_box(e);
        });
        black_box(out);
    }

    #[test]
    #[ignore = "a timing loop"]
    fn streams_to_an_openai_client() {
        let bedrock = bedrock_stream();
        let anthropic = anthropic_events();
        let rounds = crate::timing::rounds();
        let bedrock_ns = crate::timing::best_of_five(rounds, &|| {
            translated(Dialect::Bedrock, &|t, out| {
                t.bytes(black_box(&bedrock), out, |e| {
                    black_box(e);
                })
                .unwrap();
            });
        });
        let anthropic_ns = crate::timing::best_of_five(rounds, &|| {
            translated(Dialect::Anthropic, &|t, out| {
                for e in &anthropic {
                    t.event(black_box(e), out, |e| {
                        black_box(e);
                    })
                    .unwrap();
                }
            });
        });
        println!(
            "Bedrock → OpenAI stream: {bedrock_ns:.0} ns; Anthropic → OpenAI stream: {anthropic_ns:.0} ns"
        );
    }
}
