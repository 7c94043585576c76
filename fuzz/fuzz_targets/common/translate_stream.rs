//! What `translate_stream_anthropic_openai` and `translate_stream_openai_anthropic` share:
//! an upstream stream in one dialect, cut into fuzzer-chosen chunks, read as the proxy reads
//! a translated stream (`SseScanner::delivering` hands each whole event's `data` to a
//! `StreamTranslator`), and the client's stream checked.
//!
//! Input: three header bytes, then the upstream stream (raw SSE bytes: events end at blank
//! lines, `data:` lines are their payload, as `stream.rs` reads them; the seeds are recorded
//! streams). Byte 0: bit 0 the client's `include_usage`, bits 1-3 the event size limit
//! (`LIMITS`, 0 = the proxy's default), bits 4-7 the largest chunk (`CHUNKS`, 0 = the whole
//! stream at once); byte 1 seeds the chunk sizes; byte 2, when not 0, is a timeout of the
//! gateway's (`StreamTranslator::fail`) before chunk number `byte 2 - 1` (never, past the last).
//!
//! Checked, whatever the input:
//!   - nothing panics;
//!   - the client's bytes are well-formed SSE (`event: NAME\n` for Anthropic only, then one
//!     `data: PAYLOAD\n`, then a blank line), every payload one JSON object or (OpenAI)
//!     `[DONE]`, each Anthropic payload's `type` naming its event;
//!   - after `finish()` the stream ends with exactly one terminal event and nothing after
//!     it: OpenAI `[DONE]` or an `{"error": ...}` object, Anthropic `message_stop` or `error`;
//!   - the client's stream obeys its protocol (`check_openai`, `check_anthropic`), and the
//!     canonical events shown to the meter obey `canonical::Event`'s rules (block indexes
//!     contiguous from 0 in start order, deltas and stops only for open blocks, every block
//!     stopped before `MessageStop`, nothing after `MessageStop` or `Error`); an Anthropic
//!     client's deltas are of their block's kind;
//!   - bounded output and state: the client's bytes, less the message id every OpenAI chunk
//!     repeats, are at most `OUT_FACTOR` times the upstream bytes plus `OUT_CONST`; an id is
//!     no longer than the longest upstream event; between events the translator's state (its
//!     `Debug` text) stays under `STATE_CONST` plus a multiple of the longest event and of
//!     the thinking and signature text seen (OpenAI clients keep a thinking block's text,
//!     up to `MAX_THINKING_BYTES`, to send it with its signature);
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

    fn check_state(&self) {
        let state = format!("{:?}", self.translator).len();
        let bound = STATE_CONST
            + DEBUG_FACTOR * (self.longest_event + MODEL.len())
            + DEBUG_FACTOR * self.thinking_bytes;
        assert!(
            state <= bound,
            "translator state is {state} bytes of Debug, over {bound} (longest event {}, thinking {})",
            self.longest_event,
            self.thinking_bytes
        );
    }
}

impl StreamObserver for Translating<'_> {
    fn usage(&mut self, _: modelgate_dataplane::canonical::Usage) {}
    fn output_text(&mut self, _: u64) {}
    fn finish_reason(&mut self, _: &str) {}

    fn event_data(&mut self, data: &[u8]) {
        self.longest_event = self.longest_event.max(data.len());
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

fn run(
    from: Dialect,
    to: Dialect,
    include_usage: bool,
    stream: &[u8],
    chunks: &[Range<usize>],
    max: usize,
    timeout: Option<usize>,
) -> Run {
    let mut translator = StreamTranslator::new(from, to, MODEL, CREATED, include_usage, "req-fuzz");
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
            longest_event: 0,
            thinking_bytes: 0,
        };
        for (k, c) in chunks.iter().enumerate() {
            if timeout == Some(k) {
                obs.translator
                    .fail(gateway_error(ErrorKind::Timeout, "upstream_timeout"), obs.out);
                cut_off = true;
                break;
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
            obs.translator
                .fail(gateway_error(ErrorKind::Timeout, "upstream_timeout"), obs.out);
            cut_off = true;
        }
        if !cut_off {
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
                    .unwrap_or_else(|| panic!("an Anthropic event without its name: {block:?}")),
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
            assert!(finished, "a chunk without a choice before the finish: {}", e.data);
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
                assert!(n < tools, "arguments for tool call {n} of {tools}: {}", e.data);
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
        assert_eq!(ev["type"], name, "the event line names its data: {}", e.data);
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
    }
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

    let events = parse_sse(&r.out, to == Dialect::Anthropic);
    let Some(last) = events.last() else {
        panic!("the client's stream ended without a terminal event");
    };
    assert!(is_terminal(last, to), "the last event is no terminal one: {:?}", last.data);
    let terminals = events.iter().filter(|e| is_terminal(e, to)).count();
    assert_eq!(terminals, 1, "terminal events: {}", String::from_utf8_lossy(&r.out));

    let id_bytes = match to {
        Dialect::OpenAiChat => check_openai(&events, include_usage),
        Dialect::Anthropic => {
            check_anthropic(&events);
            0
        }
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
    if let Dialect::OpenAiChat = to {
        for e in &events {
            if let Ok(m) = serde_json::from_str::<Map<String, Value>>(e.data)
                && let Some(Value::String(id)) = m.get("id")
            {
                assert!(id.len() <= r.longest_event, "an id longer than any upstream event");
            }
        }
    }

    if !r.cut_off && chunks.len() > 1 {
        let whole = run(from, to, include_usage, stream, &[0..stream.len()], max, None);
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
