//! The stream scanner against the wire formats of real servers, as their documentation and
//! issue threads show them: one `<case>.sse` per server, the expected metering in
//! `<case>.json`, and, where a usage-only chunk exists, the bytes a client that did not ask
//! for usage receives in `<case>.stripped.sse`. A new case is new files, not new code.
//!
//! Each case is fed whole, one byte at a time and in random splits: the forwarded bytes and
//! the metered numbers must not depend on how the upstream's writes were cut.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use modelgate_dataplane::meter::estimated_output_tokens;
use modelgate_dataplane::stream::{DEFAULT_MAX_EVENT_BYTES, SseScanner, Tally};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    usage: Option<Usage>,
    output_chars: u64,
    finish_reason: Option<String>,
    usage_stripped: bool,
    charged: Charged,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct Charged {
    #[serde(default)]
    input_tokens: Option<u64>,
    output_tokens: u64,
    usage: String,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sse")
}

fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".sse").map(str::to_owned))
        .filter(|n| !n.ends_with(".stripped"))
        .collect();
    names.sort();
    names
}

fn scan(strip: bool, chunks: &[&[u8]]) -> (Vec<u8>, Tally) {
    let mut s = SseScanner::new(strip, DEFAULT_MAX_EVENT_BYTES);
    let mut tally = Tally::default();
    let mut out = Vec::new();
    for c in chunks {
        s.feed(Bytes::copy_from_slice(c), &mut tally, |b| {
            out.extend_from_slice(&b)
        })
        .unwrap();
    }
    assert_eq!(s.finish(&mut tally), None, "every event ends");
    (out, tally)
}

/// Whole, byte by byte, and a few random splits.
fn splits(wire: &[u8], seed: u64) -> Vec<Vec<&[u8]>> {
    let mut all = vec![vec![wire], wire.chunks(1).collect()];
    let mut rng = fastrand::Rng::with_seed(seed);
    for _ in 0..20 {
        let mut rest = wire;
        let mut chunks = Vec::new();
        while !rest.is_empty() {
            let (a, b) = rest.split_at(rng.usize(1..=rest.len().min(64)));
            chunks.push(a);
            rest = b;
        }
        all.push(chunks);
    }
    all
}

#[test]
fn fixtures_are_metered_and_forwarded_exactly() {
    let names = cases();
    assert!(names.len() >= 9, "fixtures found: {names:?}");
    for name in names {
        let wire = std::fs::read(dir().join(format!("{name}.sse"))).unwrap();
        let expected: Expected =
            serde_json::from_slice(&std::fs::read(dir().join(format!("{name}.json"))).unwrap())
                .unwrap();
        let stripped = if expected.usage_stripped {
            std::fs::read(dir().join(format!("{name}.stripped.sse"))).unwrap()
        } else {
            wire.clone()
        };
        assert_eq!(
            expected.usage_stripped,
            stripped.len() < wire.len(),
            "{name}: a stripped file removes the usage chunk"
        );
        for (i, chunks) in splits(&wire, name.len() as u64).iter().enumerate() {
            let ctx = format!("{name}, split #{i}");
            let (out, tally) = scan(false, chunks);
            assert!(
                out == wire,
                "{ctx}: the client asked for usage: bytes as they came"
            );
            let (out_stripped, tally_stripped) = scan(true, chunks);
            assert!(
                out_stripped == stripped,
                "{ctx}: forwarded without usage:\n{}",
                String::from_utf8_lossy(&out_stripped)
            );
            assert_eq!(
                tally, tally_stripped,
                "{ctx}: stripping does not change metering"
            );

            assert_eq!(
                tally.usage.map(|u| (u.prompt(), u.output.unwrap_or(0))),
                expected
                    .usage
                    .as_ref()
                    .map(|u| (u.prompt_tokens, u.completion_tokens)),
                "{ctx}: usage (every prompt token, cached or not)"
            );
            assert_eq!(tally.output_chars, expected.output_chars, "{ctx}: text");
            assert_eq!(tally.finish_reason, expected.finish_reason, "{ctx}: finish");
            let (input, output, source) = match tally.usage {
                Some(u) => (Some(u.prompt()), u.output.unwrap_or(0), "reported"),
                None => (
                    None,
                    estimated_output_tokens(tally.output_chars),
                    "estimated",
                ),
            };
            assert_eq!(
                (input, output, source),
                (
                    expected.charged.input_tokens,
                    expected.charged.output_tokens,
                    expected.charged.usage.as_str()
                ),
                "{ctx}: charged"
            );
        }
    }
}
