//! An Anthropic client's request translated for an OpenAI-shaped backend: bytes →
//! `anthropic::request_in` → `openai_chat::request_out` (a fixed upstream model; both
//! `max_completion_tokens` and `max_tokens` as the field for the limit) →
//! `openai_chat::request_in`, the reader of an OpenAI client's body.
//!
//! Input: the client's body, as is. Checked, whatever the body:
//!   - nothing panics; a refusal has a message; `request_out` refuses only more than four
//!     stop sequences (`stop_sequences`), the most an OpenAI request takes;
//!   - the upstream body is one JSON object with the given `model`, the client's
//!     `max_tokens` under the chosen field and not under the other, and `stream_options`
//!     with `include_usage` exactly when streaming;
//!   - `openai_chat::request_in` reads it back unless it refuses naming `messages` (an image
//!     by URL that is neither http(s) nor a data URL: Anthropic's reader passes any URL);
//!   - what it reads back is what was sent: model, `max_tokens`, stream, `include_usage`,
//!     stop sequences, user, tool names, choice of tool, `parallel_tool_calls`, reasoning
//!     (a thinking budget becomes an effort, adaptive or disabled thinking none), the JSON
//!     schema's text, the assistants' tool calls (id, name, and the arguments' text, `{}` for
//!     arguments that are no JSON object) and the users' tool results (ids), in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::canonical::{Block, Effort, Reasoning, Request, ResponseFormat, Role};
use modelgate_dataplane::translate::openai_chat::{self, MaxTokensField, Out};
use modelgate_dataplane::translate::anthropic;
use serde_json::{Map, Value};

const MODEL: &str = "gpt-upstream \"\u{1F680}\"";

/// The assistants' tool calls (id, name, arguments) and the users' tool
/// results (ids), in order: what an OpenAI body can carry.
type Tools = (Vec<(String, String, String)>, Vec<String>);

fn tool_blocks(req: &Request) -> Tools {
    let mut calls = Vec::new();
    let mut results = Vec::new();
    for m in &req.messages {
        for b in &m.content {
            match (m.role, b) {
                (
                    Role::Assistant,
                    Block::ToolUse {
                        id, name, input, ..
                    },
                ) => calls.push((
                    id.clone(),
                    name.clone(),
                    // Arguments that are no JSON object are sent and read back as `{}`.
                    if input.get().starts_with('{') {
                        input.get().to_owned()
                    } else {
                        "{}".to_owned()
                    },
                )),
                (Role::User, Block::ToolResult { tool_use_id, .. }) => {
                    results.push(tool_use_id.clone())
                }
                _ => {}
            }
        }
    }
    (calls, results)
}

fn schema(req: &Request) -> Option<&str> {
    match &req.response_format {
        Some(ResponseFormat::JsonSchema { schema, .. }) => Some(schema.get()),
        _ => None,
    }
}

fn check(req: &Request, field: MaxTokensField) {
    let out = match openai_chat::request_out(
        req,
        MODEL,
        Out {
            max_tokens_field: field,
        },
    ) {
        Ok(out) => out,
        Err(e) => {
            assert_eq!(e.param, Some("stop_sequences"), "{e:?}");
            assert!(req.stop.len() > 4);
            return;
        }
    };
    let fields: Map<String, Value> = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "the upstream body is not a JSON object ({e}): {}",
            String::from_utf8_lossy(&out)
        )
    });
    assert_eq!(fields["model"], MODEL);
    let (named, other) = match field {
        MaxTokensField::MaxCompletionTokens => ("max_completion_tokens", "max_tokens"),
        MaxTokensField::MaxTokens => ("max_tokens", "max_completion_tokens"),
    };
    assert_eq!(fields.get(named).and_then(Value::as_u64), req.max_output_tokens);
    assert!(!fields.contains_key(other));
    assert_eq!(
        fields.get("stream_options").map(|o| &o["include_usage"]),
        req.stream.then_some(&Value::Bool(true))
    );

    let back = match openai_chat::request_in(&out) {
        Ok(back) => back,
        Err(e) if e.param == Some("messages") => return,
        Err(e) => panic!(
            "the OpenAI reader refuses the translated body: {e:?}\n{}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(back.model, MODEL);
    assert_eq!(back.max_output_tokens, req.max_output_tokens);
    assert_eq!(back.stream, req.stream);
    assert_eq!(back.include_usage, req.stream);
    assert_eq!(back.stop, req.stop);
    assert_eq!(back.user, req.user);
    let names = |r: &Request| r.tools.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&back), names(req));
    assert_eq!(back.tool_choice, req.tool_choice);
    assert_eq!(back.parallel_tool_calls, req.parallel_tool_calls);
    let reasoning = match req.reasoning {
        Some(Reasoning::Budget(n)) => Some(Reasoning::Effort(match n {
            0..4096 => Effort::Low,
            4096..16384 => Effort::Medium,
            _ => Effort::High,
        })),
        Some(Reasoning::Off | Reasoning::Adaptive) => None,
        r => r,
    };
    assert_eq!(back.reasoning, reasoning);
    assert_eq!(schema(&back), schema(req));
    assert_eq!(tool_blocks(&back), tool_blocks(req));
}

fuzz_target!(|body: &[u8]| {
    let req = match anthropic::request_in(body) {
        Ok(req) => req,
        Err(e) => {
            assert!(!e.message.is_empty());
            return;
        }
    };
    assert!(req.max_output_tokens.is_some_and(|m| m > 0));
    check(&req, MaxTokensField::MaxCompletionTokens);
    check(&req, MaxTokensField::MaxTokens);
});
