//! Streams made from whole answers, and the text of whole answers.
//!
//! Some OpenAI-compatible servers (and caches in front of them) answer a stream request with
//! one JSON body. The client asked for server-sent events, so the gateway writes the answer as
//! the stream such a server would have sent, and meters it like any stream:
//!
//! ```text
//!  chat.completion ─► per choice: role, reasoning, content, refusal, tool calls (in pieces)
//!                  ─► per choice: finish_reason ─► usage chunk (if the client asked) ─► [DONE]
//!  text_completion ─► per choice: text (in pieces), finish_reason ─► usage ─► [DONE]
//! ```
//!
//! Anything that is not a complete answer of the endpoint asked is refused (the proxy makes it a
//! 502). Text is cut into pieces of at most [`PIECE_CHARS`] characters so no event nears the
//! stream's event size limit. Generated text is counted by the rule the stream scanner uses
//! (`content`, `text`, `reasoning_content`, `arguments`), so an answer without usage is
//! estimated alike whether it was streamed or not. Pure functions of bytes: no I/O here.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::canonical::Usage;
use crate::request::Endpoint;
use crate::stream::UsageWire;

/// Most characters of text one synthesized event carries.
pub const PIECE_CHARS: usize = 4096;

/// Why a body cannot be passed on as an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAnAnswer {
    #[error("the body is not a JSON object")]
    NotJson,
    #[error("the JSON is not a complete {0} response")]
    Incomplete(&'static str),
}

/// A whole answer written as a stream.
#[derive(Debug)]
pub struct Synthesized {
    /// Server-sent events, the last one `data: [DONE]`.
    pub events: Vec<Bytes>,
    /// The answer's own usage, if it reported one.
    pub usage: Option<Usage>,
}

/// The body as a JSON object, or why not.
fn object(body: &[u8]) -> Result<Map<String, Value>, NotAnAnswer> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(NotAnAnswer::NotJson),
    }
}

/// Characters of generated text in a whole JSON answer, for an estimate when it reports no
/// usage. Fails when the body is not a JSON object.
pub fn output_chars(body: &[u8]) -> Result<u64, NotAnAnswer> {
    let answer = object(body)?;
    let chars = |v: Option<&Value>| v.map_or(0, |v| text_of(v).chars().count() as u64);
    let Some(Value::Array(choices)) = answer.get("choices") else {
        return Ok(0);
    };
    let mut n = 0u64;
    for c in choices {
        n = n.saturating_add(chars(c.get("text")));
        let Some(m) = c.get("message") else { continue };
        n = n
            .saturating_add(chars(m.get("content")))
            .saturating_add(chars(m.get("reasoning_content")))
            .saturating_add(chars(m.pointer("/function_call/arguments")));
        if let Some(Value::Array(calls)) = m.get("tool_calls") {
            for call in calls {
                n = n.saturating_add(chars(call.pointer("/function/arguments")));
            }
        }
    }
    Ok(n)
}

/// A text field: a string, or content parts whose `text`s join up; anything else is none.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// `s` in pieces of at most [`PIECE_CHARS`] characters; none for an empty string.
fn pieces(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let cut = rest
            .char_indices()
            .nth(PIECE_CHARS)
            .map_or(rest.len(), |(i, _)| i);
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    out
}

fn event(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    // Serializing a `Value` cannot fail.
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Write a whole answer of `endpoint` as the stream the client asked for. `model` and `now`
/// stand in for the answer's `model` and `created` when it has none. The usage chunk is
/// written only when `include_usage` (the client's `stream_options.include_usage`) and the
/// answer has usage to report.
pub fn stream_of_answer(
    endpoint: Endpoint,
    body: &[u8],
    include_usage: bool,
    model: &str,
    now: u64,
) -> Result<Synthesized, NotAnAnswer> {
    let answer = object(body)?;
    let (kind, chunk_object, id) = match endpoint {
        Endpoint::Chat => (
            "chat.completion",
            "chat.completion.chunk",
            "chatcmpl-modelgate",
        ),
        Endpoint::Completions => ("text_completion", "text_completion", "cmpl-modelgate"),
        // Answers in the other dialects are written as streams by `translate`.
        Endpoint::Embeddings | Endpoint::Messages | Endpoint::CountTokens | Endpoint::Responses => {
            return Err(NotAnAnswer::Incomplete("streamable"));
        }
    };
    let incomplete = NotAnAnswer::Incomplete(kind);
    if answer
        .get("object")
        .is_some_and(|o| o.as_str() != Some(kind))
    {
        return Err(incomplete);
    }
    let Some(Value::Array(choices)) = answer.get("choices") else {
        return Err(incomplete);
    };
    if choices.is_empty() {
        return Err(incomplete);
    }

    let mut envelope = Map::new();
    envelope.insert(
        "id".into(),
        answer
            .get("id")
            .filter(|v| v.is_string())
            .cloned()
            .unwrap_or_else(|| json!(id)),
    );
    envelope.insert("object".into(), json!(chunk_object));
    envelope.insert(
        "created".into(),
        answer
            .get("created")
            .filter(|v| v.is_u64())
            .cloned()
            .unwrap_or(json!(now)),
    );
    envelope.insert(
        "model".into(),
        answer
            .get("model")
            .filter(|v| v.is_string())
            .cloned()
            .unwrap_or_else(|| json!(model)),
    );
    if let Some(fp) = answer.get("system_fingerprint").filter(|v| v.is_string()) {
        envelope.insert("system_fingerprint".into(), fp.clone());
    }
    let chunk = |choices: Value| {
        let mut v = envelope.clone();
        v.insert("choices".into(), choices);
        event(&Value::Object(v))
    };

    let mut events = Vec::new();
    for (i, choice) in choices.iter().enumerate() {
        let index = choice.get("index").filter(|v| v.is_u64()).cloned();
        let index = index.unwrap_or(json!(i));
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        let deltas = match endpoint {
            Endpoint::Chat => chat_deltas(choice).ok_or(incomplete.clone())?,
            _ => {
                let Some(Value::String(text)) = choice.get("text") else {
                    return Err(incomplete);
                };
                pieces(text)
                    .into_iter()
                    .map(|p| json!({"text": p}))
                    .collect()
            }
        };
        for d in deltas {
            let c = match endpoint {
                Endpoint::Chat => {
                    json!({"index": index, "delta": d, "logprobs": null, "finish_reason": null})
                }
                _ => {
                    json!({"index": index, "text": d["text"], "logprobs": null, "finish_reason": null})
                }
            };
            events.push(chunk(json!([c])));
        }
        let last = match endpoint {
            Endpoint::Chat => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish})
            }
            _ => json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish}),
        };
        events.push(chunk(json!([last])));
    }

    let usage_value = answer.get("usage").filter(|u| u.is_object());
    let usage = usage_value
        .and_then(|u| serde_json::from_value::<UsageWire>(u.clone()).ok())
        .map(|u| u.normalized());
    if include_usage && let Some(u) = usage_value {
        let mut v = envelope.clone();
        v.insert("choices".into(), json!([]));
        v.insert("usage".into(), u.clone());
        events.push(event(&Value::Object(v)));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Ok(Synthesized { events, usage })
}

/// The deltas of one chat choice, the role in the first; `None` when it has no message.
fn chat_deltas(choice: &Value) -> Option<Vec<Value>> {
    let Some(Value::Object(message)) = choice.get("message") else {
        return None;
    };
    let text = |name: &str| -> Option<String> {
        match message.get(name) {
            None | Some(Value::Null) => Some(String::new()),
            Some(v @ (Value::String(_) | Value::Array(_))) => Some(text_of(v)),
            Some(_) => None,
        }
    };
    let mut deltas: Vec<Value> = Vec::new();
    for field in ["reasoning_content", "content", "refusal"] {
        for p in pieces(&text(field)?) {
            deltas.push(json!({ field: p }));
        }
    }
    if let Some(calls) = message.get("tool_calls").filter(|v| !v.is_null()) {
        let Value::Array(calls) = calls else {
            return None;
        };
        for (k, call) in calls.iter().enumerate() {
            let function = call.get("function")?;
            let args = function
                .get("arguments")
                .and_then(Value::as_str)
                .unwrap_or("");
            let mut first = json!({
                "index": k,
                "id": call.get("id").cloned().unwrap_or(Value::Null),
                "type": call.get("type").cloned().unwrap_or(json!("function")),
                "function": {"name": function.get("name").cloned().unwrap_or(Value::Null), "arguments": ""},
            });
            let mut args = pieces(args).into_iter();
            first["function"]["arguments"] = json!(args.next().unwrap_or(""));
            deltas.push(json!({"tool_calls": [first]}));
            for p in args {
                deltas.push(json!({"tool_calls": [{"index": k, "function": {"arguments": p}}]}));
            }
        }
    }
    if let Some(Value::Object(call)) = message.get("function_call") {
        let args = call.get("arguments").and_then(Value::as_str).unwrap_or("");
        let mut args = pieces(args).into_iter();
        deltas.push(json!({"function_call": {
            "name": call.get("name").cloned().unwrap_or(Value::Null),
            "arguments": args.next().unwrap_or(""),
        }}));
        for p in args {
            deltas.push(json!({"function_call": {"arguments": p}}));
        }
    }
    let role = message
        .get("role")
        .filter(|r| r.is_string())
        .cloned()
        .unwrap_or(json!("assistant"));
    match deltas.first_mut() {
        Some(Value::Object(first)) => {
            first.insert("role".into(), role);
        }
        _ => deltas.push(json!({"role": role, "content": ""})),
    }
    Some(deltas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{SseScanner, Tally};

    /// The events' JSON, `[DONE]` left out; asserts the stream ends with it.
    fn parse(s: &Synthesized) -> Vec<Value> {
        let text: String = s
            .events
            .iter()
            .map(|e| String::from_utf8(e.to_vec()).unwrap())
            .collect();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .expect("every event is one data line")
            })
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// What the proxy's stream scanner meters from the synthesized bytes.
    fn scanned(s: &Synthesized) -> Tally {
        let mut scanner = SseScanner::new(false, crate::stream::DEFAULT_MAX_EVENT_BYTES);
        let mut tally = Tally::default();
        for e in &s.events {
            scanner.feed(e.clone(), &mut tally, |_| {}).unwrap();
        }
        scanner.finish(&mut tally);
        tally
    }

    fn delta_text(events: &[Value], field: &str) -> String {
        events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"][field].as_str())
            .collect()
    }

    const CHAT: &str = r#"{
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
        "model": "gpt-x", "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello \"world\" ✓"},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    }"#;

    #[test]
    fn a_chat_answer_becomes_chunks_with_role_content_and_finish() {
        let s = stream_of_answer(Endpoint::Chat, CHAT.as_bytes(), false, "m", 1).unwrap();
        let events = parse(&s);
        assert_eq!(events.len(), 2, "content, finish: {events:?}");
        for e in &events {
            assert_eq!(e["object"], "chat.completion.chunk");
            assert_eq!(e["id"], "chatcmpl-1");
            assert_eq!(e["created"], 1_700_000_000);
            assert_eq!(e["model"], "gpt-x");
            assert_eq!(e["system_fingerprint"], "fp_1");
            assert!(e.get("usage").is_none());
        }
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(delta_text(&events, "content"), "Hello \"world\" ✓");
        assert_eq!(events[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(events[1]["choices"][0]["delta"], json!({}));
        assert_eq!(events[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            s.usage,
            Some(Usage {
                input: Some(9),
                output: Some(4),
                ..Usage::default()
            })
        );
        // The scanner meters the synthesized stream like an upstream's.
        let t = scanned(&s);
        assert_eq!(t.output_chars, 15);
        assert_eq!(t.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            t.usage, None,
            "no usage chunk for a client that did not ask"
        );
    }

    #[test]
    fn the_usage_chunk_comes_only_when_asked_for_and_last_before_done() {
        let s = stream_of_answer(Endpoint::Chat, CHAT.as_bytes(), true, "m", 1).unwrap();
        let events = parse(&s);
        let last = events.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["total_tokens"], 13);
        assert_eq!(scanned(&s).usage, s.usage);
        // An answer without usage has none to report, asked or not.
        let mut v: Value = serde_json::from_str(CHAT).unwrap();
        v.as_object_mut().unwrap().remove("usage");
        let s = stream_of_answer(Endpoint::Chat, v.to_string().as_bytes(), true, "m", 1).unwrap();
        assert_eq!(s.usage, None);
        assert!(parse(&s).iter().all(|e| e.get("usage").is_none()));
    }

    #[test]
    fn tool_calls_stream_with_ids_names_and_arguments() {
        let body = json!({
            "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
                ]}}]
        });
        let s =
            stream_of_answer(Endpoint::Chat, body.to_string().as_bytes(), false, "m", 5).unwrap();
        let events = parse(&s);
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[0]["model"], "m", "the requested model stands in");
        assert_eq!(events[0]["id"], "chatcmpl-modelgate");
        assert_eq!(events[0]["created"], 5);
        let first = &events[0]["choices"][0]["delta"];
        assert_eq!(first["role"], "assistant");
        assert_eq!(
            first["tool_calls"],
            json!([{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}])
        );
        assert_eq!(
            events[1]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "call_b"
        );
        assert_eq!(
            events[1]["choices"][0]["delta"]["tool_calls"][0]["index"],
            1
        );
        assert_eq!(events[2]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(scanned(&s).output_chars, 7 + 2);
        assert_eq!(output_chars(body.to_string().as_bytes()), Ok(9));
    }

    #[test]
    fn several_choices_keep_their_indexes() {
        let body = json!({"choices": [
            {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"},
            {"index": 1, "message": {"content": "bb"}, "finish_reason": "length"}
        ]});
        let events = parse(
            &stream_of_answer(Endpoint::Chat, body.to_string().as_bytes(), false, "m", 0).unwrap(),
        );
        let of = |i: u64| -> Vec<&Value> {
            events
                .iter()
                .filter(|e| e["choices"][0]["index"] == i)
                .collect()
        };
        assert_eq!(of(0)[0]["choices"][0]["delta"]["content"], "a");
        assert_eq!(of(1)[0]["choices"][0]["delta"]["content"], "bb");
        assert_eq!(
            of(1).last().unwrap()["choices"][0]["finish_reason"],
            "length"
        );
    }

    #[test]
    fn long_text_is_cut_into_pieces_on_character_boundaries() {
        let text = "é".repeat(PIECE_CHARS * 2 + 3);
        let body = json!({"choices": [{"message": {"content": text}, "finish_reason": "stop"}]});
        let s =
            stream_of_answer(Endpoint::Chat, body.to_string().as_bytes(), false, "m", 0).unwrap();
        let events = parse(&s);
        assert_eq!(events.len(), 4, "three pieces and the finish");
        assert_eq!(delta_text(&events, "content"), text);
        assert_eq!(scanned(&s).output_chars, text.chars().count() as u64);
        assert!(s.events.iter().all(|e| e.len() < PIECE_CHARS * 3));
    }

    #[test]
    fn a_completion_answer_becomes_text_completion_chunks() {
        let body = br#"{"id":"cmpl-1","object":"text_completion","created":3,"model":"c",
            "choices":[{"index":0,"text":"once upon","logprobs":null,"finish_reason":"length"}],
            "usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}"#;
        let s = stream_of_answer(Endpoint::Completions, body, true, "m", 0).unwrap();
        let events = parse(&s);
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events.iter().all(|e| e["object"] == "text_completion"));
        assert_eq!(events[0]["choices"][0]["text"], "once upon");
        assert_eq!(events[1]["choices"][0]["text"], "");
        assert_eq!(events[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(events[2]["usage"]["prompt_tokens"], 2);
        let t = scanned(&s);
        assert_eq!(t.output_chars, 9);
        assert_eq!(t.usage.and_then(|u| u.output), Some(2));
    }

    #[test]
    fn anything_but_a_complete_answer_is_refused() {
        let chat = |b: &[u8]| stream_of_answer(Endpoint::Chat, b, false, "m", 0).map(|_| ());
        let incomplete = Err(NotAnAnswer::Incomplete("chat.completion"));
        assert_eq!(chat(b"plain text"), Err(NotAnAnswer::NotJson));
        assert_eq!(chat(b""), Err(NotAnAnswer::NotJson));
        assert_eq!(chat(b"[1,2]"), Err(NotAnAnswer::NotJson));
        assert_eq!(
            chat(br#"{"choices":[{"message":{"content":"a"}}]"#),
            Err(NotAnAnswer::NotJson)
        );
        assert_eq!(chat(br#"{"error":{"message":"busy"}}"#), incomplete);
        assert_eq!(chat(br#"{"choices":[]}"#), incomplete);
        assert_eq!(chat(br#"{"choices":[{"text":"a"}]}"#), incomplete);
        assert_eq!(
            chat(br#"{"choices":[{"message":{"content":5}}]}"#),
            incomplete
        );
        assert_eq!(
            chat(br#"{"object":"chat.completion.chunk","choices":[{"delta":{"content":"a"}}]}"#),
            incomplete
        );
        assert_eq!(
            chat(br#"{"choices":[{"message":{"tool_calls":"x"}}]}"#),
            incomplete
        );
        assert_eq!(
            stream_of_answer(Endpoint::Completions, CHAT.as_bytes(), false, "m", 0).map(|_| ()),
            Err(NotAnAnswer::Incomplete("text_completion"))
        );
    }

    #[test]
    fn output_chars_counts_what_the_stream_scanner_counts() {
        let body = json!({"choices": [
            {"message": {"content": "abcd", "reasoning_content": "xy",
                         "function_call": {"name": "f", "arguments": "{}"}}},
            {"text": "12345"},
            {"message": {"content": [{"type": "text", "text": "pq"}]}}
        ]});
        assert_eq!(
            output_chars(body.to_string().as_bytes()),
            Ok(4 + 2 + 2 + 5 + 2)
        );
        assert_eq!(output_chars(br#"{"data":[]}"#), Ok(0));
        assert_eq!(output_chars(b"<html>"), Err(NotAnAnswer::NotJson));
        assert_eq!(output_chars(b"\"str\""), Err(NotAnAnswer::NotJson));
    }
}
