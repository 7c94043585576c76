//! An OpenAI chat client's request translated for an Anthropic backend: bytes →
//! `openai_chat::request_in` → `anthropic::request_out` (a fixed upstream model, a default
//! `max_tokens`) → `anthropic::request_in`, the reader of an Anthropic client's body.
//!
//! Input: the client's body, as is. Checked, whatever the body:
//!   - nothing panics; a refusal has a message, and `request_out` refuses only naming a field
//!     (serialising never fails);
//!   - the upstream body is one JSON object with the given `model` and `max_tokens`: the
//!     client's `max_completion_tokens` or `max_tokens`, else the default;
//!   - `anthropic::request_in` reads it back, except where a refusal is documented: an
//!     OpenAI `max_tokens: 0` is sent as is, and Anthropic's reader refuses `max_tokens: 0`
//!     (it only warms the prompt cache); server tools cannot arise from an OpenAI body;
//!   - what it reads back is what was sent: model, `max_tokens`, stream, stop sequences, user,
//!     tool names, the choice of tool (when there are tools), reasoning (`minimal` effort is
//!     Anthropic's `low`), the JSON schema's text, and the tool calls (id, name, arguments
//!     text) and tool results (ids) in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::canonical::{
    Block, Effort, Reasoning, Request, ResponseFormat, Role, ToolChoice,
};
use modelgate_dataplane::translate::{anthropic, openai_chat};
use serde_json::{Map, Value};

const MODEL: &str = "claude-upstream \"\u{1F680}\"";
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// (id, name, arguments) of the tool calls, and the ids of the tool results, in order.
type Tools = (Vec<(String, String, String)>, Vec<String>);

fn tool_blocks(req: &Request) -> Tools {
    let mut calls = Vec::new();
    let mut results = Vec::new();
    for m in &req.messages {
        for b in &m.content {
            match b {
                Block::ToolUse {
                    id, name, input, ..
                } => calls.push((id.clone(), name.clone(), input.get().to_owned())),
                Block::ToolResult { tool_use_id, .. } => results.push(tool_use_id.clone()),
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

fuzz_target!(|body: &[u8]| {
    let req = match openai_chat::request_in(body) {
        Ok(req) => req,
        Err(e) => {
            assert!(!e.message.is_empty());
            return;
        }
    };
    let out = match anthropic::request_out(
        &req,
        MODEL,
        anthropic::Out {
            default_max_tokens: DEFAULT_MAX_TOKENS,
        },
    ) {
        Ok(out) => out,
        Err(e) => {
            assert!(e.param.is_some(), "request_out failed without a field: {e:?}");
            assert!(!e.message.is_empty());
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
    let max_tokens = req.max_output_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    assert_eq!(fields.get("max_tokens").and_then(Value::as_u64), Some(max_tokens));
    assert!(fields["messages"].is_array());

    let back = match anthropic::request_in(&out) {
        Ok(back) => back,
        Err(e) if max_tokens == 0 && e.param == Some("max_tokens") => return,
        Err(e) => panic!(
            "Anthropic's reader refuses the translated body: {e:?}\n{}",
            String::from_utf8_lossy(&out)
        ),
    };
    assert_eq!(back.model, MODEL);
    assert_eq!(back.max_output_tokens, Some(max_tokens));
    assert_eq!(back.stream, req.stream);
    assert_eq!(back.stop, req.stop);
    assert_eq!(back.user, req.user);
    let names = |r: &Request| r.tools.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&back), names(&req));
    if !req.tools.is_empty() && req.tool_choice.is_some() {
        assert_eq!(back.tool_choice, req.tool_choice);
    }
    if req.tools.is_empty() {
        assert_eq!(back.tool_choice, None::<ToolChoice>);
    }
    let reasoning = match req.reasoning {
        Some(Reasoning::Effort(Effort::Minimal)) => Some(Reasoning::Effort(Effort::Low)),
        r => r,
    };
    assert_eq!(back.reasoning, reasoning);
    if let Some(s) = schema(&req) {
        assert_eq!(schema(&back), Some(s));
    }
    assert!(back.messages.iter().all(|m| m.role != Role::System));
    assert_eq!(tool_blocks(&back), tool_blocks(&req));
});
