//! An OpenAI Responses client's request translated for every backend API: bytes →
//! `openai_responses::request_in` → `openai_chat::request_out` (both fields for the limit),
//! `anthropic::request_out`, `bedrock::request_out` (both model families) and
//! `gemini::request_out` (levels and budgets, with and without a default limit), with
//! `bedrock::dropped` and `gemini::ignored`.
//!
//! Input: the client's body, as is. Checked, whatever the body:
//!   - nothing panics; a refusal (of the reader or of a writer) has a message, at most
//!     `MAX_REFUSAL` bytes, and a writer's names a field;
//!   - every body written is one JSON object; the OpenAI and Anthropic ones carry the given
//!     `model` and `messages`, the Bedrock one `messages`, the Gemini one `contents`;
//!   - `openai_chat::request_in` reads the OpenAI body back with the same model, stream and
//!     tool names, unless it refuses naming `messages` (content the chat API takes in another
//!     form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::canonical::Request;
use modelgate_dataplane::translate::openai_chat::{MaxTokensField, Out};
use modelgate_dataplane::translate::{
    Refused, anthropic, bedrock, gemini, openai_chat, openai_responses,
};
use serde_json::{Map, Value};

const MODEL: &str = "upstream-model \"\u{1F680}\"";
/// A refusal quotes at most a field's name and a clipped parser complaint.
const MAX_REFUSAL: usize = 4096;

fn refused(api: &str, e: &Refused, writer: bool) {
    assert!(!e.message.is_empty(), "{api}: a refusal without a message");
    assert!(
        e.message.len() <= MAX_REFUSAL,
        "{api}: a refusal of {} bytes",
        e.message.len()
    );
    if writer {
        assert!(e.param.is_some(), "{api}: a refusal naming no field: {e:?}");
    }
}

/// The body a writer made, as a JSON object; `None` when it refused.
fn written(api: &str, out: Result<Vec<u8>, Refused>) -> Option<Map<String, Value>> {
    match out {
        Ok(body) => Some(serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{api}: the upstream body is not a JSON object ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })),
        Err(e) => {
            refused(api, &e, true);
            None
        }
    }
}

fn openai(req: &Request, field: MaxTokensField) {
    let out = openai_chat::request_out(
        req,
        MODEL,
        Out {
            max_tokens_field: field,
        },
    );
    let body = match out {
        Ok(body) => body,
        Err(e) => {
            refused("openai_chat", &e, true);
            return;
        }
    };
    let Some(fields) = written("openai_chat", Ok(body.clone())) else {
        return;
    };
    assert_eq!(fields["model"], MODEL);
    assert!(fields["messages"].is_array());
    let back = match openai_chat::request_in(&body) {
        Ok(back) => back,
        Err(e) if e.param == Some("messages") => return,
        Err(e) => panic!(
            "the OpenAI reader refuses the translated body: {e:?}\n{}",
            String::from_utf8_lossy(&body)
        ),
    };
    assert_eq!(back.model, MODEL);
    assert_eq!(back.stream, req.stream);
    let names = |r: &Request| r.tools.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&back), names(req));
}

fuzz_target!(|body: &[u8]| {
    let req = match openai_responses::request_in(body) {
        Ok(req) => req,
        Err(e) => {
            refused("openai_responses::request_in", &e, false);
            return;
        }
    };

    openai(&req, MaxTokensField::MaxCompletionTokens);
    openai(&req, MaxTokensField::MaxTokens);

    let out = anthropic::request_out(
        &req,
        MODEL,
        anthropic::Out {
            default_max_tokens: 4096,
        },
    );
    if let Some(fields) = written("anthropic", out) {
        assert_eq!(fields["model"], MODEL);
        assert!(fields["messages"].is_array());
    }

    for family in [bedrock::Family::Anthropic, bedrock::Family::Other] {
        let out = bedrock::Out {
            max_tokens: 4096,
            family,
        };
        let _ = bedrock::dropped(&req, out);
        if let Some(fields) = written("bedrock", bedrock::request_out(&req, out)) {
            assert!(fields["messages"].is_array());
        }
    }

    let _ = gemini::ignored(&req);
    for thinking in [gemini::ThinkingStyle::Level, gemini::ThinkingStyle::Budget] {
        for max_tokens in [None, Some(4096)] {
            let out = gemini::Out {
                max_tokens,
                thinking,
            };
            if let Some(fields) = written("gemini", gemini::request_out(&req, out)) {
                assert!(fields["contents"].is_array());
            }
        }
    }
});
