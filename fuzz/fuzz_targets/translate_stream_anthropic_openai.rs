//! An Anthropic backend's stream translated for an OpenAI chat client
//! (`StreamTranslator::new(Dialect::Anthropic, Dialect::OpenAiChat, ..)`), read as the proxy
//! reads it. Input format and invariants: `common/translate_stream.rs` (three header bytes,
//! then the upstream SSE bytes; never panics, valid SSE of JSON payloads, exactly one
//! terminal event — `[DONE]` or an error object — and nothing after it, the chat chunk
//! protocol, bounded output and state, every cut of the stream translating alike).
#![no_main]

#[path = "common/translate_stream.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::translate::Dialect;

fuzz_target!(|input: &[u8]| {
    common::fuzz(Dialect::Anthropic, Dialect::OpenAiChat, input);
});
