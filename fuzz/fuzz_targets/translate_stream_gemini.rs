//! A Gemini backend's `streamGenerateContent?alt=sse` stream translated for each client:
//! `StreamTranslator::new(Dialect::Gemini, <OpenAI chat, Anthropic or Responses>, ..)`, read
//! as the proxy reads it (thought signatures travel in tool-call ids).
//!
//! Input: one byte choosing the client (0 OpenAI chat, 1 Anthropic, 2 Responses, modulo 3),
//! then the format and invariants of `common/translate_stream.rs` (three header bytes, then
//! the upstream SSE bytes; never panics, valid SSE of JSON payloads, exactly one terminal
//! event and nothing after it, the client's stream protocol, bounded output and state, every
//! cut of the stream translating alike).
#![no_main]

#[path = "common/translate_stream.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::translate::Dialect;

const PAIRS: [(Dialect, Dialect); 3] = [
    (Dialect::Gemini, Dialect::OpenAiChat),
    (Dialect::Gemini, Dialect::Anthropic),
    (Dialect::Gemini, Dialect::OpenAiResponses),
];

fuzz_target!(|input: &[u8]| {
    common::fuzz_pairs(&PAIRS, input);
});
