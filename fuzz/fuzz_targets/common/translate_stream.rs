//! What the `translate_stream_*` targets share: an upstream stream in one dialect, cut into
//! fuzzer-chosen chunks, read as the proxy reads a translated stream (`SseScanner::delivering`
//! hands each whole event's `data` to a `StreamTranslator`; a binary Bedrock stream goes to
//! `StreamTranslator::bytes` chunk by chunk, as `stream.rs` feeds it), and the client's stream
//! checked.
//!
//! Input: three header bytes, then the upstream stream (raw SSE bytes: events end at blank
//! lines, `data:` lines are their payload, as `stream.rs` reads them; for Bedrock the
//! event-stream frames; the seeds are recorded streams). Byte 0: bit 0 the client's
//! `include_usage`, bits 1-3 the event size limit (`LIMITS`, 0 = the proxy's default; SSE
//! only), bits 4-7 the largest chunk (`CHUNKS`, 0 = the whole stream at once); byte 1 seeds the
//! chunk sizes; byte 2, when not 0, is a timeout of the gateway's (`StreamTranslator::fail`)
//! before chunk number `byte 2 - 1` (never, past the last). `fuzz_pairs` takes one more byte
//! first, choosing the (backend, client) pair.
//!
//! Checked, whatever the input:
//!   - nothing panics;
//!   - the client's bytes are well-formed SSE (`event: NAME\n` for Anthropic and Responses
//!     clients only, then one `data: PAYLOAD\n`, then a blank line), every payload one JSON
//!     object or (OpenAI) `[DONE]`, each named payload's `type` naming its event;
//!   - after `finish()` the stream ends with exactly one terminal event and nothing after
//!     it: OpenAI `[DONE]` or an `{"error": ...}` object, Anthropic `message_stop` or `error`,
//!     Responses `response.completed`, `response.incomplete` or `response.failed`;
//!   - the client's stream obeys its protocol (`check_openai`, `check_anthropic`,
//!     `check_responses`), and the canonical events shown to the meter obey
//!     `canonical::Event`'s rules (block indexes contiguous from 0 in start order, deltas and
//!     stops only for open blocks, every block stopped before `MessageStop`, nothing after
//!     `MessageStop` or `Error`); an Anthropic client's deltas are of their block's kind;
//!   - bounded output and state: the client's bytes, less the ids every OpenAI chunk and
//!     Responses event repeats, are at most `OUT_FACTOR` times the upstream bytes plus
//!     `OUT_CONST`; an id is no longer than the longest upstream event (or the gateway's
//!     request id) plus a prefix; between events the translator's state (its `Debug` text)
//!     stays under `STATE_CONST` plus a multiple of the longest event and of the thinking and
//!     signature text seen (OpenAI clients keep a thinking block's text, up to
//!     `MAX_THINKING_BYTES`, to send it with its signature), plus, where the translator must
//!     hold the stream's content, a multiple of the upstream bytes so far (a Responses client's
//!     final `response` repeats the whole answer; a Bedrock redacted-reasoning block is
//!     joined from its deltas);
//!   - every cut of the stream into chunks gives what the whole stream in one chunk gives
//!     (same client bytes, same metered events), unless the event limit or the timeout hit.

use std::ops::Range;

use bytes::Bytes;
use modelgate_dataplane::canonical::{ApiError, BlockKind, Delta, ErrorKind, Event};
use modelgate_dataplane::stream::{DEFAULT_MAX_EVENT_BYTES, SseScanner, StreamObserver};
use modelgate_dataplane::translate::{Dialect, StreamTranslator};
use serde_json::{Map, Value};

pub const MODEL: &str = "public-model";
const CREATED: u64 = 1_700_000_000;
/// The gateway's request id: the answer's id where the backend's stream names none.
const REQUEST_ID: &str = "req-fuzz";
/// What a client's id may add to the upstream's: `resp_`, `msg_`, `_511`.
const ID_PREFIX: usize = 16;

const LIMITS: [usize; 8] = [DEFAULT_MAX_EVENT_BYTES, 8, 24, 64, 100, 256, 1024, 4096];
const CHUNKS: [usize; 16] = [0, 1, 2, 3, 5, 8, 13, 32, 64, 128, 512, 4096, 1, 2, 7, 16];

/// Client bytes per upstream byte, at most (the largest ratio is a tool call opened by a
/// dozen upstream bytes, `{"index":N}`, which costs an Anthropic client a
/// `content_block_start` and a `content_block_stop`, about 200 bytes).
const OUT_FACTOR: usize = 32;
/// Client bytes a stream may cost beyond that: `message_start`, the terminal event, an
/// error message.
const OUT_CONST: usize = 4096;
/// The translator's fixed-size state at its caps (128 open blocks or tool calls, counters).
const STATE_CONST: usize = 32 * 1024;
/// `Debug` writes a byte of a string as at most this many (`\u{1f}`).
const DEBUG_FACTOR: usize = 8;

struct Run {
    out: Vec<u8>,
    seen: Vec<Event>,
    /// The event limit or the timeout ended the stream.
    cut_off: bool,
    longest_event: usize,
}

/// The proxy's observer of a translated stream, recording and checking as it goes.
struct Translating<'a> {
    translator: &'a mut StreamTranslator,
    out: &'a mut Vec<u8>,
    seen: &'a mut Vec<Event>,
    longest_event: usize,
    thinking_bytes: usize,
    /// Upstream bytes read so far, and blocks started.
    fed: usize,
    blocks: usize,
    /// Events of `seen` counted into `blocks`.
    counted: usize,
    /// The translator holds what it read: a Responses client (the whole answer, for the
    /// final `response`), a Bedrock backend (a redacted block's pieces).
    holds_content: bool,
}

impl Translating<'_> {
    fn record(seen: &mut Vec<Event>, thinking: &mut usize, e: &Event) {
        if let Event::BlockDelta {
            delta: Delta::Thinking(t) | Delta::Signature(t),
            ..
        } = e
        {
            *thinking += t.len();
        }
        seen.push(e.clone());
    }

    fn check_state(&mut self) {
        self.blocks += self.seen[self.counted..]
            .iter()
            .filter(|e| matches!(e, Event::BlockStart { .. }))
            .count();
        self.counted = self.seen.len();
        let state = format!("{:?}", self.translator).len();
        let held = if self.holds_content {
            self.fed + self.blocks * (self.longest_event.max(REQUEST_ID.len()) + 2 * ID_PREFIX)
        } else {
            0
        };
        let bound = STATE_CONST
            + DEBUG_FACTOR * (self.longest_event + MODEL.len())
            + DEBUG_FACTOR * self.thinking_bytes
            + DEBUG_FACTOR * held;
        assert!(
            state <= bound,
            "translator state is {state} bytes of Debug, over {bound} (longest event {}, thinking {}, fed {}, blocks {})",
            self.longest_event,
            self.thinking_bytes,
            self.fed,
            self.blocks
        );
    }

    /// Bytes of a binary stream, as `stream.rs` hands them over; an error ends the stream
    /// (the translator wrote its error event) and later bytes are ignored.
    fn bytes(&mut self, chunk: &[u8]) {
        self.fed += chunk.len();
        let (seen, thinking) = (&mut *self.seen, &mut self.thinking_bytes);
        let _ = self
            .translator
            .bytes(chunk, self.out, |e| Self::record(seen, thinking, e));
        self.check_state();
    }
}

impl StreamObserver for Translating<'_> {
    fn usage(&mut self, _: modelgate_dataplane::canonical::Usage) {}
    fn output_text(&mut self, _: u64) {}
    fn finish_reason(&mut self, _: &str) {}

    fn event_data(&mut self, data: &[u8]) {
        self.longest_event = self.longest_event.max(data.len());
        self.fed += data.len();
        let (seen, thinking) = (&mut *self.seen, &mut self.thinking_bytes);
        // An unreadable event ends the stream with an error event the translator writes;
        // the proxy then ends the body. Later events are ignored by the translator.
        let _ = self
            .translator
            .event(data, self.out, |e| Self::record(seen, thinking, e));
        self.check_state();
    }
}

fn gateway_error(kind: ErrorKind, code: &str) -> ApiError {
    ApiError {
        status: 502,
        kind,
        message: "the gateway ended the stream".into(),
        param: None,
        code: Some(code.into()),
    }
}

/// The longest message of an event stream, by the lengths its preludes announce (the rest
/// of the stream where one announces more than is left).
fn longest_frame(stream: &[u8]) -> usize {
    let mut longest = 0;
    let mut at = 0;
    while let Some(prelude) = stream.get(at..at + 4) {
        let total = u32::from_be_bytes([prelude[0], prelude[1], prelude[2], prelude[3]]) as usize;
        let left = stream.len() - at;
        longest = longest.max(total.min(left));
        if total < 16 || total > left {
            break;
        }
        at += total;
    }
    longest
}

fn run(
    from: Dialect,
    to: Dialect,
    include_usage: bool,
    stream: &[u8],
    chunks: &[Range<usize>],
    max: usize,
    timeout: Option<usize>,
) -> Run {
    let mut translator = StreamTranslator::new(from, to, MODEL, CREATED, include_usage, REQUEST_ID);
    assert_eq!(translator.binary(), from.binary_stream());
    let mut scanner = SseScanner::delivering(max);
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let mut cut_off = false;
    let longest_event;
    {
        let mut obs = Translating {
            translator: &mut translator,
            out: &mut out,
            seen: &mut seen,
            longest_event: if from.binary_stream() {
                longest_frame(stream)
            } else {
                0
            },
            thinking_bytes: 0,
            fed: 0,
            blocks: 0,
            counted: 0,
            holds_content: to == Dialect::OpenAiResponses || from == Dialect::Bedrock,
        };
        for (k, c) in chunks.iter().enumerate() {
            if timeout == Some(k) {
                obs.translator.fail(
                    gateway_error(ErrorKind::Timeout, "upstream_timeout"),
                    obs.out,
                );
                cut_off = true;
                break;
            }
            if from.binary_stream() {
                obs.bytes(&stream[c.clone()]);
                continue;
            }
            let chunk = Bytes::copy_from_slice(&stream[c.clone()]);
            if scanner.feed(chunk, &mut obs, |_| {}).is_err() {
                obs.translator.fail(
                    gateway_error(ErrorKind::Server, "upstream_event_too_large"),
                    obs.out,
                );
                cut_off = true;
                break;
            }
        }
        if !cut_off && timeout == Some(chunks.len()) {
            obs.translator.fail(
                gateway_error(ErrorKind::Timeout, "upstream_timeout"),
                obs.out,
            );
            cut_off = true;
        }
        if !cut_off && !from.binary_stream() {
            // An event cut off without its blank line still counts, as in the proxy.
            let _ = scanner.finish(&mut obs);
        }
        longest_event = obs.longest_event;
        let (seen, mut thinking) = (&mut *obs.seen, obs.thinking_bytes);
        obs.translator
            .finish(obs.out, |e| Translating::record(seen, &mut thinking, e));
    }
    // `finish` again (a second end of the body) adds nothing.
    let before = out.len();
    translator.finish(&mut out, |e| panic!("a second finish showed {e:?}"));
    assert_eq!(out.len(), before, "a second finish wrote more");
    let mut none = Vec::new();
    translator.fail(gateway_error(ErrorKind::Timeout, "late"), &mut none);
    assert!(none.is_empty(), "a failure after the end wrote more");
    Run {
        out,
        seen,
        cut_off,
        longest_event,
    }
}

/// Chunk boundaries from a seed: sizes 1..=`cap`, with an empty chunk now and then.
fn cut(len: usize, cap: usize, seed: u8) -> Vec<Range<usize>> {
    if cap == 0 {
        return vec![0..len];
    }
    let mut chunks = Vec::new();
    let mut x = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as usize
    };
    let mut at = 0;
    while at < len {
        if next() % 8 == 0 {
            chunks.push(at..at);
        }
        let end = (at + 1 + next() % cap).min(len);
        chunks.push(at..end);
        at = end;
    }
    chunks
}

/// One event of the client's stream: its `event:` name, if any, and its `data`.
struct SseEvent<'a> {
    name: Option<&'a str>,
    data: &'a str,
}

/// The client's bytes as the translators write them; panics on anything else.
fn parse_sse(out: &[u8], named: bool) -> Vec<SseEvent<'_>> {
    let text = std::str::from_utf8(out).expect("the client's stream is UTF-8");
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "the client's stream does not end with a blank line: {text:?}"
    );
    let mut events = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find("\n\n").expect("checked above");
        let block = &rest[..end];
        rest = &rest[end + 2..];
        let mut lines = block.split('\n');
        let name = if named {
            let line = lines.next().unwrap_or("");
            Some(
                line.strip_prefix("event: ")
                    .unwrap_or_else(|| panic!("a named event without its name: {block:?}")),
            )
        } else {
            None
        };
        let data = lines
            .next()
            .and_then(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("an event without its data line: {block:?}"));
        assert!(
            lines.next().is_none(),
            "an event of more than one data line: {block:?}"
        );
        events.push(SseEvent { name, data });
    }
    events
}

fn object(data: &str) -> Map<String, Value> {
    match serde_json::from_str::<Value>(data) {
        Ok(Value::Object(m)) => m,
        _ => panic!("a data payload that is not a JSON object: {data:?}"),
    }
}

/// OpenAI chat chunks: the finish once, then at most the usage chunk (exactly one when the
/// client asked for it and the stream completed), tool calls numbered from 0 in start order.
/// Returns the bytes of the ids the chunks repeat.
fn check_openai(events: &[SseEvent], include_usage: bool) -> usize {
    let mut id_bytes = 0;
    let mut tools = 0u64;
    let mut finished = false;
    let mut usage_chunks = 0;
    let last = events.len().saturating_sub(1);
    for (i, e) in events.iter().enumerate() {
        if e.data == "[DONE]" {
            assert_eq!(i, last, "events after [DONE]");
            assert!(finished, "[DONE] without a finish_reason chunk");
            assert_eq!(
                usage_chunks,
                usize::from(include_usage),
                "usage chunks before [DONE] (include_usage {include_usage})"
            );
            continue;
        }
        let chunk = object(e.data);
        if let Some(err) = chunk.get("error") {
            assert_eq!(i, last, "events after an error");
            let err = err.as_object().expect("`error` is an object");
            assert!(err["message"].is_string(), "{err:?}");
            assert!(err["type"].is_string(), "{err:?}");
            continue;
        }
        assert_eq!(chunk["object"], "chat.completion.chunk", "{}", e.data);
        assert_eq!(chunk["model"], MODEL, "{}", e.data);
        let id = chunk["id"].as_str().expect("a chunk's id is a string");
        id_bytes += serde_json::to_string(id).unwrap().len();
        let choices = chunk["choices"].as_array().expect("choices is an array");
        assert!(choices.len() <= 1, "{}", e.data);
        if finished {
            assert!(choices.is_empty(), "a choice after the finish: {}", e.data);
        }
        if choices.is_empty() {
            assert!(
                finished,
                "a chunk without a choice before the finish: {}",
                e.data
            );
            assert!(chunk["usage"].is_object(), "{}", e.data);
            usage_chunks += 1;
            continue;
        }
        let choice = &choices[0];
        assert_eq!(choice["index"], 0, "{}", e.data);
        if let Some(calls) = choice["delta"].get("tool_calls") {
            let calls = calls.as_array().expect("tool_calls is an array");
            assert_eq!(calls.len(), 1, "{}", e.data);
            let n = calls[0]["index"].as_u64().expect("a tool call's index");
            if calls[0].get("id").is_some() {
                assert_eq!(n, tools, "a new tool call's index: {}", e.data);
                assert!(calls[0]["function"]["name"].is_string(), "{}", e.data);
                tools += 1;
            } else {
                assert!(
                    n < tools,
                    "arguments for tool call {n} of {tools}: {}",
                    e.data
                );
            }
        }
        if !choice["finish_reason"].is_null() {
            assert!(choice["finish_reason"].is_string(), "{}", e.data);
            finished = true;
        }
    }
    id_bytes
}

/// Which Anthropic delta types a block of a type takes.
fn delta_fits(block: &str, delta: &str) -> bool {
    matches!(
        (block, delta),
        ("text", "text_delta")
            | ("tool_use", "input_json_delta")
            | ("thinking", "thinking_delta" | "signature_delta")
    )
}

/// Anthropic stream events: `message_start` first and once (unless the stream is one lone
/// `error`), blocks numbered from 0 in start order, deltas of the block's kind to open
/// blocks, `message_delta` then `message_stop` with every block stopped.
fn check_anthropic(events: &[SseEvent]) {
    let mut open: Vec<(u64, String)> = Vec::new();
    let mut started = 0u64;
    let last = events.len().saturating_sub(1);
    for (i, e) in events.iter().enumerate() {
        let ev = object(e.data);
        let name = e.name.expect("named");
        assert_eq!(
            ev["type"], name,
            "the event line names its data: {}",
            e.data
        );
        match name {
            "message_start" => {
                assert_eq!(i, 0, "message_start not first");
                assert_eq!(ev["message"]["model"], MODEL);
            }
            "error" => {
                assert_eq!(i, last, "events after an error");
                assert!(ev["error"]["type"].is_string(), "{}", e.data);
                assert!(ev["error"]["message"].is_string(), "{}", e.data);
                continue;
            }
            _ => assert!(i > 0, "{name} before message_start"),
        }
        let index = || ev["index"].as_u64().expect("a block event's index");
        match name {
            "content_block_start" => {
                assert_eq!(index(), started, "blocks start in order from 0");
                started += 1;
                let kind = ev["content_block"]["type"].as_str().expect("block type");
                open.push((index(), kind.to_owned()));
            }
            "content_block_delta" => {
                let Some((_, kind)) = open.iter().find(|(i, _)| *i == index()) else {
                    panic!("a delta for a block not open: {}", e.data);
                };
                let delta = ev["delta"]["type"].as_str().expect("delta type");
                assert!(delta_fits(kind, delta), "{delta} in a {kind} block");
            }
            "content_block_stop" => {
                let at = open
                    .iter()
                    .position(|(i, _)| *i == index())
                    .unwrap_or_else(|| panic!("a stop for a block not open: {}", e.data));
                open.remove(at);
            }
            "message_delta" => {
                assert_eq!(
                    events.get(i + 1).and_then(|n| n.name),
                    Some("message_stop"),
                    "message_delta not right before message_stop"
                );
                assert!(ev["delta"]["stop_reason"].is_string(), "{}", e.data);
                assert!(ev["usage"].is_object(), "{}", e.data);
            }
            "message_stop" => {
                assert_eq!(i, last, "events after message_stop");
                assert!(open.is_empty(), "message_stop with blocks open: {open:?}");
            }
            "message_start" => {}
            other => panic!("an event the translator does not write: {other}"),
        }
    }
}

/// `canonical::Event`'s rules on what the meter saw.
fn check_canonical(seen: &[Event]) {
    let mut open: Vec<(u32, &BlockKind)> = Vec::new();
    let mut next = 0u32;
    for (i, e) in seen.iter().enumerate() {
        match e {
            Event::BlockStart { index, kind } => {
                assert_eq!(*index, next, "canonical blocks start in order from 0");
                next += 1;
                open.push((*index, kind));
            }
            Event::BlockDelta { index, delta } => {
                // The delta's kind need not be the block's: the Anthropic reader passes a
                // `thinking_delta` to a text block on as it came (the rules do not forbid it).
                assert!(
                    open.iter().any(|(i, _)| i == index),
                    "a canonical delta for block {index}, not open: {delta:?}"
                );
            }
            Event::BlockStop { index } => {
                let at = open
                    .iter()
                    .position(|(i, _)| i == index)
                    .unwrap_or_else(|| panic!("a canonical stop for block {index}, not open"));
                open.remove(at);
            }
            Event::MessageStop { .. } => {
                assert!(open.is_empty(), "MessageStop with blocks open: {open:?}");
                assert_eq!(i, seen.len() - 1, "canonical events after MessageStop");
            }
            Event::Error(_) => {
                assert_eq!(i, seen.len() - 1, "canonical events after an Error");
            }
            Event::MessageStart { .. } | Event::Usage(_) => {}
        }
    }
}

fn is_terminal(e: &SseEvent, to: Dialect) -> bool {
    match to {
        Dialect::OpenAiChat => {
            e.data == "[DONE]"
                || serde_json::from_str::<Map<String, Value>>(e.data)
                    .is_ok_and(|m| m.contains_key("error"))
        }
        Dialect::Anthropic => matches!(e.name, Some("message_stop" | "error")),
        Dialect::OpenAiResponses => matches!(
            e.name,
            Some("response.completed" | "response.incomplete" | "response.failed")
        ),
        Dialect::Bedrock | Dialect::Gemini => panic!("no client speaks {to:?}"),
    }
}

/// The bytes of the ids a Responses stream repeats: every `id` and `item_id` (the response's,
/// and each item's, made from it) wherever it appears.
fn id_bytes(v: &Value) -> usize {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match (k.as_str(), v) {
                ("id" | "item_id", Value::String(s)) => serde_json::to_string(s).unwrap().len(),
                _ => id_bytes(v),
            })
            .sum(),
        Value::Array(a) => a.iter().map(id_bytes).sum(),
        _ => 0,
    }
}

/// Every `id` and `item_id` string of a payload.
fn ids<'a>(v: &'a Value, found: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("id" | "item_id", Value::String(s)) => found.push(s),
                    _ => ids(v, found),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| ids(v, found)),
        _ => {}
    }
}

/// An output item of a Responses stream as its events built it.
struct Item {
    id: String,
    kind: String,
    done: bool,
    /// The text, arguments or summary its deltas carried.
    text: String,
}

/// What an item's finished form says its deltas added up to.
fn item_text(item: &Value) -> Option<String> {
    match item["type"].as_str()? {
        "message" => Some(
            item["content"]
                .as_array()?
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect(),
        ),
        "function_call" => item["arguments"].as_str().map(str::to_owned),
        "reasoning" => Some(
            item["summary"]
                .as_array()?
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect(),
        ),
        _ => None,
    }
}

/// Responses stream events, as the openai SDK's `responses.stream()` accumulates them:
/// `sequence_number` counting from 0, `response.created` then `response.in_progress` first,
/// items added in output order, deltas and `.done` events only for items added and not yet
/// done and of the item's type, each finished item holding what its deltas added up to, and
/// the terminal event's `response` (status matching the event, the same id) listing every
/// item, all done unless the stream failed; an `error` event only right before
/// `response.failed`. Returns the bytes of the ids the events repeat.
fn check_responses(events: &[SseEvent]) -> usize {
    let mut repeated = 0;
    let mut items: Vec<Item> = Vec::new();
    let mut response_id: Option<String> = None;
    let last = events.len().saturating_sub(1);
    for (i, e) in events.iter().enumerate() {
        let v: Value = Value::Object(object(e.data));
        repeated += id_bytes(&v);
        let name = e.name.expect("named");
        assert_eq!(v["type"], name, "the event line names its data: {}", e.data);
        assert_eq!(
            v["sequence_number"], i as u64,
            "sequence_number: {}",
            e.data
        );
        match (i, name) {
            (0, "response.created") | (1, "response.in_progress") => {}
            (0 | 1, _) => panic!("the stream does not start with created, in_progress: {name}"),
            (_, "response.created" | "response.in_progress") => panic!("{name} again at {i}"),
            _ => {}
        }
        let item_at = |items: &mut Vec<Item>| -> usize {
            let n = v["output_index"].as_u64().expect("output_index") as usize;
            let item = items
                .get(n)
                .unwrap_or_else(|| panic!("an event for item {n}, not added: {}", e.data));
            assert!(!item.done, "an event for item {n}, done: {}", e.data);
            if let Some(id) = v.get("item_id") {
                assert_eq!(id, item.id.as_str(), "item_id of item {n}: {}", e.data);
            }
            n
        };
        match name {
            "response.created" | "response.in_progress" => {
                let r = &v["response"];
                assert_eq!(r["status"], "in_progress", "{}", e.data);
                assert_eq!(r["model"], MODEL, "{}", e.data);
                let id = r["id"].as_str().expect("the response's id").to_owned();
                if let Some(first) = &response_id {
                    assert_eq!(&id, first, "the response's id changed");
                }
                response_id = Some(id);
            }
            "response.output_item.added" => {
                assert_eq!(v["output_index"], items.len() as u64, "{}", e.data);
                let item = &v["item"];
                items.push(Item {
                    id: item["id"].as_str().expect("an item's id").to_owned(),
                    kind: item["type"].as_str().expect("an item's type").to_owned(),
                    done: false,
                    text: String::new(),
                });
            }
            "response.content_part.added" | "response.content_part.done" => {
                let n = item_at(&mut items);
                assert_eq!(items[n].kind, "message", "{}", e.data);
            }
            "response.output_text.delta" | "response.output_text.done" => {
                let n = item_at(&mut items);
                assert_eq!(items[n].kind, "message", "{}", e.data);
                if name.ends_with("delta") {
                    items[n]
                        .text
                        .push_str(v["delta"].as_str().expect("a delta"));
                } else {
                    assert_eq!(v["text"], items[n].text.as_str(), "{}", e.data);
                }
            }
            "response.function_call_arguments.delta" | "response.function_call_arguments.done" => {
                let n = item_at(&mut items);
                assert_eq!(items[n].kind, "function_call", "{}", e.data);
                if name.ends_with("delta") {
                    items[n]
                        .text
                        .push_str(v["delta"].as_str().expect("a delta"));
                } else {
                    assert_eq!(v["arguments"], items[n].text.as_str(), "{}", e.data);
                }
            }
            "response.reasoning_summary_part.added"
            | "response.reasoning_summary_part.done"
            | "response.reasoning_summary_text.delta"
            | "response.reasoning_summary_text.done" => {
                let n = item_at(&mut items);
                assert_eq!(items[n].kind, "reasoning", "{}", e.data);
                if name == "response.reasoning_summary_text.delta" {
                    items[n]
                        .text
                        .push_str(v["delta"].as_str().expect("a delta"));
                } else if name == "response.reasoning_summary_text.done" {
                    assert_eq!(v["text"], items[n].text.as_str(), "{}", e.data);
                }
            }
            "response.output_item.done" => {
                let n = item_at(&mut items);
                let item = &v["item"];
                assert_eq!(item["id"], items[n].id.as_str(), "{}", e.data);
                assert_eq!(item["type"], items[n].kind.as_str(), "{}", e.data);
                assert!(
                    item.get("status").is_none_or(|s| s == "completed"),
                    "{}",
                    e.data
                );
                assert_eq!(
                    item_text(item).as_deref(),
                    Some(items[n].text.as_str()),
                    "a finished item is not what its deltas added up to: {}",
                    e.data
                );
                items[n].done = true;
            }
            "error" => {
                assert_eq!(
                    i + 1,
                    last,
                    "an error event not right before response.failed"
                );
                assert_eq!(events[last].name, Some("response.failed"));
                assert!(v["message"].is_string(), "{}", e.data);
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                assert_eq!(i, last, "events after {name}");
                let r = &v["response"];
                let status = name.strip_prefix("response.").unwrap_or(name);
                assert_eq!(r["status"], status, "{}", e.data);
                assert_eq!(r["model"], MODEL, "{}", e.data);
                assert_eq!(r["id"].as_str(), response_id.as_deref(), "{}", e.data);
                let output = r["output"].as_array().expect("the response's output");
                assert_eq!(output.len(), items.len(), "output items: {}", e.data);
                for (item, o) in items.iter().zip(output) {
                    assert_eq!(o["id"], item.id.as_str(), "{}", e.data);
                    assert_eq!(o["type"], item.kind.as_str(), "{}", e.data);
                    if status != "failed" {
                        assert!(item.done, "{name} with item {} open", item.id);
                    }
                    if item.done {
                        assert_eq!(item_text(o).as_deref(), Some(item.text.as_str()));
                    }
                }
                if status == "failed" {
                    assert!(r["error"]["message"].is_string(), "{}", e.data);
                }
            }
            other => panic!("an event the translator does not write: {other}"),
        }
    }
    repeated
}

pub fn fuzz(from: Dialect, to: Dialect, input: &[u8]) {
    let [flags, seed, timeout, stream @ ..] = input else {
        return;
    };
    let include_usage = flags & 1 == 1;
    let max = LIMITS[usize::from((flags >> 1) & 7)];
    let cap = CHUNKS[usize::from(flags >> 4)];
    let timeout = (*timeout != 0).then(|| usize::from(*timeout) - 1);

    let chunks = cut(stream.len(), cap, *seed);
    let r = run(from, to, include_usage, stream, &chunks, max, timeout);

    let events = parse_sse(&r.out, to != Dialect::OpenAiChat);
    let Some(last) = events.last() else {
        panic!("the client's stream ended without a terminal event");
    };
    assert!(
        is_terminal(last, to),
        "the last event is no terminal one: {:?}",
        last.data
    );
    let terminals = events.iter().filter(|e| is_terminal(e, to)).count();
    assert_eq!(
        terminals,
        1,
        "terminal events: {}",
        String::from_utf8_lossy(&r.out)
    );

    let id_bytes = match to {
        Dialect::OpenAiChat => check_openai(&events, include_usage),
        Dialect::Anthropic => {
            check_anthropic(&events);
            0
        }
        Dialect::OpenAiResponses => check_responses(&events),
        Dialect::Bedrock | Dialect::Gemini => unreachable!("is_terminal panicked"),
    };
    check_canonical(&r.seen);

    let bound = OUT_FACTOR * stream.len() + OUT_CONST;
    assert!(
        r.out.len() - id_bytes <= bound,
        "{} client bytes ({} of them repeated ids) for {} upstream bytes",
        r.out.len(),
        id_bytes,
        stream.len()
    );
    // An id comes from the upstream's events, or is the gateway's request id where the
    // backend's stream names none (Bedrock's never does, Gemini's may not).
    let longest_id = match (from, to) {
        (Dialect::OpenAiChat | Dialect::Anthropic, Dialect::OpenAiChat) => r.longest_event,
        (_, Dialect::OpenAiChat) => r.longest_event.max(REQUEST_ID.len()),
        (_, _) => r.longest_event.max(REQUEST_ID.len()) + ID_PREFIX,
    };
    for e in &events {
        if let Ok(v) = serde_json::from_str::<Value>(e.data) {
            let mut found = Vec::new();
            match (to, v.get("id")) {
                (Dialect::OpenAiChat, Some(Value::String(id))) => found.push(id.as_str()),
                (Dialect::OpenAiResponses, _) => ids(&v, &mut found),
                _ => {}
            }
            for id in found {
                assert!(
                    id.len() <= longest_id,
                    "an id of {} bytes, longer than any upstream event ({longest_id})",
                    id.len()
                );
            }
        }
    }

    if !r.cut_off && chunks.len() > 1 {
        let whole = run(
            from,
            to,
            include_usage,
            stream,
            &[0..stream.len()],
            max,
            None,
        );
        if !whole.cut_off {
            assert_eq!(
                String::from_utf8_lossy(&r.out),
                String::from_utf8_lossy(&whole.out),
                "cut into {} chunks of at most {cap} bytes (seed {seed})",
                chunks.len()
            );
            assert_eq!(r.seen, whole.seen, "metered events differ with the cut");
        }
    }
}

/// `fuzz` for one of `pairs` (backend, client), chosen by the input's first byte.
#[allow(dead_code)] // the targets of one fixed pair call `fuzz`
pub fn fuzz_pairs(pairs: &[(Dialect, Dialect)], input: &[u8]) {
    let [pick, rest @ ..] = input else {
        return;
    };
    let (from, to) = pairs[usize::from(*pick) % pairs.len()];
    fuzz(from, to, rest);
}
