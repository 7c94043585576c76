//! An OpenAI-shaped backend's stream translated for an Anthropic client
//! (`StreamTranslator::new(Dialect::OpenAiChat, Dialect::Anthropic, ..)`), read as the proxy
//! reads it. Input format and invariants: `common/translate_stream.rs` (three header bytes,
//! then the upstream SSE bytes; never panics, valid SSE of JSON payloads named by their
//! `event:` lines, exactly one terminal event — `message_stop` or `error` — and nothing
//! after it, the Messages stream protocol, bounded output and state, every cut of the
//! stream translating alike).
#![no_main]

#[path = "common/translate_stream.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::translate::Dialect;

fuzz_target!(|input: &[u8]| {
    common::fuzz(Dialect::OpenAiChat, Dialect::Anthropic, input);
});
