//! Streams to and from the OpenAI Responses dialect: a Responses backend's stream for an
//! OpenAI chat or Anthropic client, and an OpenAI-shaped or Anthropic backend's stream for a
//! Responses client, each read as the proxy reads it.
//!
//! Input: one byte choosing the pair (modulo 4): 0 Responses → OpenAI chat, 1 Responses →
//! Anthropic, 2 OpenAI chat → Responses, 3 Anthropic → Responses; then the format and
//! invariants of `common/translate_stream.rs` (three header bytes, then the upstream SSE
//! bytes; never panics, valid SSE of JSON payloads, exactly one terminal event and nothing
//! after it, the client's stream protocol — for Responses clients the event sequence the
//! openai SDK accumulates —, bounded output and state, every cut translating alike).
#![no_main]

#[path = "common/translate_stream.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::translate::Dialect;

const PAIRS: [(Dialect, Dialect); 4] = [
    (Dialect::OpenAiResponses, Dialect::OpenAiChat),
    (Dialect::OpenAiResponses, Dialect::Anthropic),
    (Dialect::OpenAiChat, Dialect::OpenAiResponses),
    (Dialect::Anthropic, Dialect::OpenAiResponses),
];

fuzz_target!(|input: &[u8]| {
    common::fuzz_pairs(&PAIRS, input);
});
