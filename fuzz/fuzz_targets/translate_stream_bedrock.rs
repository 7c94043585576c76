//! A Bedrock backend's ConverseStream (AWS's binary event stream) translated for each client:
//! `StreamTranslator::new(Dialect::Bedrock, <OpenAI chat, Anthropic or Responses>, ..)`, fed
//! the bytes in fuzzer-chosen chunks with `bytes()` as the proxy feeds them, then `finish()`.
//!
//! Input: one byte choosing the client (low 7 bits modulo 3: 0 OpenAI chat, 1 Anthropic,
//! 2 Responses) and the form of the stream, then the format and invariants of
//! `common/translate_stream.rs` (three header bytes, then the stream; never panics, valid SSE
//! of JSON payloads, exactly one terminal event and nothing after it, the client's stream
//! protocol, bounded output and state, every cut of the stream translating alike). The
//! stream is the raw event-stream bytes when the first byte's top bit is clear; when it is
//! set, lines `message-type event-type payload`, each framed here by `bedrock::encode_frame`
//! (valid CRCs, so mutations reach the payloads' reader). The seeds are the fixtures'
//! `stream-*.events.json` in both forms, written by the unit test
//! `bedrock::tests::fuzz_seeds_are_the_encoded_stream_fixtures`.
#![no_main]

#[path = "common/translate_stream.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::translate::{Dialect, bedrock};

const PAIRS: [(Dialect, Dialect); 3] = [
    (Dialect::Bedrock, Dialect::OpenAiChat),
    (Dialect::Bedrock, Dialect::Anthropic),
    (Dialect::Bedrock, Dialect::OpenAiResponses),
];

fuzz_target!(|input: &[u8]| {
    let [pick, flags, seed, timeout, lines @ ..] = input else {
        return;
    };
    if pick & 0x80 == 0 {
        common::fuzz_pairs(&PAIRS, input);
        return;
    }
    let mut framed = vec![pick & 0x7f, *flags, *seed, *timeout];
    for line in lines.split(|&b| b == b'\n') {
        let mut parts = line.splitn(3, |&b| b == b' ');
        let kind = String::from_utf8_lossy(parts.next().unwrap_or_default());
        let event = String::from_utf8_lossy(parts.next().unwrap_or_default());
        framed.extend(bedrock::encode_frame(
            &kind,
            &event,
            parts.next().unwrap_or_default(),
        ));
    }
    common::fuzz_pairs(&PAIRS, &framed);
});
