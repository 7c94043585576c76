//! Data masking: text masked whole and through the stream masker cut at fuzzer-chosen
//! points must come out the same; nothing panics; the output and what the stream masker
//! holds back stay bounded. The same input as a chat request body: a JSON body stays JSON.
//!
//! Input: two bytes that seed the cuts, then the text (lossily UTF-8). The rules are fixed:
//! every built-in detector and two custom patterns.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::mask::{MAX_HOLD, Masker, StreamMasker, Tally};
use modelgate_dataplane::request::Endpoint;
use modelgate_wire::{MASK_DETECTORS, MaskingSpec};

fn masker() -> Masker {
    let mut rules: Vec<serde_json::Value> = MASK_DETECTORS
        .iter()
        .map(|d| serde_json::json!({"name": d, "detector": d}))
        .collect();
    rules.push(serde_json::json!({"name": "ticket", "pattern": "TICKET-[0-9]{4}", "action": "mask", "keepLast": 2}));
    rules.push(serde_json::json!({"name": "quoted", "pattern": "\"[a-z]{1,40}\""}));
    let spec: MaskingSpec =
        serde_json::from_value(serde_json::json!({"rules": rules, "answers": true})).unwrap();
    Masker::new(&spec).unwrap()
}

thread_local! {
    static MASKER: Arc<Masker> = Arc::new(masker());
}

fuzz_target!(|input: &[u8]| {
    let [a, b, rest @ ..] = input else {
        return;
    };
    let m = MASKER.with(Arc::clone);
    let text = String::from_utf8_lossy(rest);
    let whole = m.mask(&text, &mut Tally::default()).into_owned();
    assert!(whole.len() <= 3 * text.len() + 64, "output bounded");

    // Cut at up to three points chosen by the seed bytes.
    let (a, b) = (usize::from(*a), usize::from(*b));
    let mut cuts: Vec<usize> = [a, b, a * 7 + b]
        .iter()
        .map(|c| c * 31 % (text.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut s = StreamMasker::new(m.clone());
    let mut tally = Tally::default();
    let mut out = String::new();
    let mut at = 0;
    for c in cuts.into_iter().chain([text.len()]) {
        let mut c = c.max(at);
        while !text.is_char_boundary(c) {
            c += 1;
        }
        out.push_str(&s.push(&text[at..c], &mut tally));
        assert!(s.held() <= (c - at) + 2 * MAX_HOLD + 64, "held back bounded");
        at = c;
    }
    out.push_str(&s.finish(&mut tally));
    assert_eq!(out, whole, "streamed and whole differ");

    // As a request body: no panic, and JSON stays JSON.
    if let Ok(Some(body)) = m.mask_request(Endpoint::Chat, rest, &mut Tally::default())
        && serde_json::from_slice::<serde_json::Value>(rest).is_ok()
    {
        assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
    }
});
