//! Upstream error bodies translated for either client: bytes and a status →
//! `anthropic::error_in` and `openai_chat::error_in` → `openai_chat::error_out` and
//! `anthropic::error_out`.
//!
//! Input: two bytes of status (big-endian, any `u16`), then the upstream's body. Checked for
//! both readers, whatever the body:
//!   - nothing panics; the error keeps the status, and its message is never empty and at most
//!     `MAX_MESSAGE` bytes (upstream text is cut at 1024 bytes), `param` and `code` at most
//!     `MAX_FIELD`;
//!   - each body written is one JSON object in its dialect's shape, carrying the message as
//!     is: OpenAI `{"error": {"message", "type", "param", "code"}}`, Anthropic
//!     `{"type": "error", "error": {"type", "message"}, "request_id"}` with the type
//!     `error_type` names; at most `MAX_BODY` bytes;
//!   - each body read back by its dialect's reader (as a gateway in front of this one
//!     would) gives the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::canonical::ApiError;
use modelgate_dataplane::translate::{anthropic, openai_chat};
use serde_json::{Map, Value};

const MAX_MESSAGE: usize = 1024;
const MAX_FIELD: usize = 256;
/// Every byte of text escaped (`\u001f`), plus the fixed words.
const MAX_BODY: usize = 6 * (MAX_MESSAGE + 2 * MAX_FIELD) + 512;
const REQUEST_ID: &str = "req_0123";

fn object(body: &[u8]) -> Map<String, Value> {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "an error body that is not a JSON object ({e}): {}",
            String::from_utf8_lossy(body)
        )
    })
}

fn check(status: u16, e: &ApiError) {
    assert_eq!(e.status, status);
    assert!(!e.message.is_empty());
    assert!(e.message.len() <= MAX_MESSAGE, "{} bytes of message", e.message.len());
    assert!(e.param.as_ref().is_none_or(|p| p.len() <= MAX_FIELD));
    assert!(e.code.as_ref().is_none_or(|c| c.len() <= MAX_FIELD));

    let openai = openai_chat::error_out(e);
    assert!(openai.len() <= MAX_BODY, "{} bytes of OpenAI error", openai.len());
    let body = object(&openai);
    let err = body["error"].as_object().expect("`error` is an object");
    assert_eq!(err["message"], e.message.as_str());
    assert!(err["type"].is_string());
    assert!(err["param"].is_null() || err["param"].is_string());
    assert!(err["code"].is_null() || err["code"].is_string());
    assert_eq!(openai_chat::error_in(status, &openai).message, e.message);

    let anthropic = anthropic::error_out(e, REQUEST_ID);
    assert!(anthropic.len() <= MAX_BODY, "{} bytes of Anthropic error", anthropic.len());
    let body = object(&anthropic);
    assert_eq!(body["type"], "error");
    assert_eq!(body["request_id"], REQUEST_ID);
    assert_eq!(body["error"]["type"], anthropic::error_type(e.kind));
    assert_eq!(body["error"]["message"], e.message.as_str());
    assert_eq!(anthropic::error_in(status, &anthropic).message, e.message);
}

fuzz_target!(|input: &[u8]| {
    let [hi, lo, body @ ..] = input else {
        return;
    };
    let status = u16::from_be_bytes([*hi, *lo]);
    check(status, &anthropic::error_in(status, body));
    check(status, &openai_chat::error_in(status, body));
});
