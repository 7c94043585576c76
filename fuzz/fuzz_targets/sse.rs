//! The SSE scanner: an upstream stream cut into fuzzer-chosen chunks.
//!
//! Input: two header bytes, then the stream. Byte 0: bit 0 `strip_usage`, bits 1-3 the event
//! size limit (`LIMITS`), bits 4-7 the largest chunk (`CHUNKS`, 0 = the whole stream at
//! once); byte 1 seeds the chunk sizes (and a few empty chunks between them).
//!
//! Checked against a plain reading of the spec (`split`): the stream's events end at blank
//! lines (LF, CRLF or CR), a leading BOM is no part of the first field.
//!   - Forwarded bytes are the stream's events in order, each whole or left out, then the
//!     unfinished tail; only usage-only chunks (a JSON object with a `usage` object and no
//!     `choices`) are left out, and only with `strip_usage`, and all of them are.
//!   - When an event is over the limit: what went out is the events before it, as above,
//!     and more than the limit was held back (the proxy then sends its error event).
//!   - Every cut gives what the whole stream in one chunk gives: the same bytes and the same
//!     reports to the observer, in the same order.
//!   - The usage metered last is the last usage object the stream carries.
#![no_main]

use std::collections::BTreeSet;
use std::ops::Range;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::canonical::Usage;
use modelgate_dataplane::stream::{
    DEFAULT_MAX_EVENT_BYTES, ScanError, SseScanner, StreamObserver, UsageWire,
};
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

const LIMITS: [usize; 8] = [DEFAULT_MAX_EVENT_BYTES, 0, 8, 24, 64, 100, 256, 1024];
const CHUNKS: [usize; 16] = [0, 1, 2, 3, 5, 8, 13, 32, 64, 128, 512, 4096, 1, 2, 7, 16];
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One report of the scanner to its observer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Report {
    Usage(Usage),
    Text(u64),
    Finish(String),
}

/// Records every report, in order.
#[derive(Default)]
struct Recorder(Vec<Report>);

impl StreamObserver for Recorder {
    fn usage(&mut self, usage: Usage) {
        self.0.push(Report::Usage(usage));
    }
    fn output_text(&mut self, chars: u64) {
        self.0.push(Report::Text(chars));
    }
    fn finish_reason(&mut self, reason: &str) {
        self.0.push(Report::Finish(reason.to_owned()));
    }
}

struct Run {
    out: Vec<u8>,
    reports: Vec<Report>,
    /// Bytes fed until the end or the error.
    fed: usize,
    error: Option<ScanError>,
}

fn run(stream: &[u8], chunks: &[Range<usize>], strip: bool, max: usize) -> Run {
    let mut scanner = SseScanner::new(strip, max);
    let mut rec = Recorder::default();
    let mut out = Vec::new();
    let mut fed = 0;
    for c in chunks {
        fed = c.end;
        let chunk = Bytes::copy_from_slice(&stream[c.clone()]);
        if let Err(e) = scanner.feed(chunk, &mut rec, |b| out.extend_from_slice(&b)) {
            return Run {
                out,
                reports: rec.0,
                fed,
                error: Some(e),
            };
        }
    }
    if let Some(rest) = scanner.finish(&mut rec) {
        out.extend_from_slice(&rest);
    }
    Run {
        out,
        reports: rec.0,
        fed,
        error: None,
    }
}

/// Chunk boundaries from a seed: sizes 1..=`cap`, with an empty chunk now and then.
fn cut(len: usize, cap: usize, seed: u8) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    if cap == 0 {
        chunks.push(0..len);
        return chunks;
    }
    let mut x = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as usize
    };
    let mut at = 0;
    while at < len {
        if next() % 8 == 0 {
            chunks.push(at..at);
        }
        let end = (at + 1 + next() % cap).min(len);
        chunks.push(at..end);
        at = end;
    }
    chunks
}

/// An event as the spec reads it: its bytes (with the blank line) and its `data` field.
struct Event {
    range: Range<usize>,
    data: Option<Vec<u8>>,
}

/// The events of a whole stream and its unfinished tail (data read to the end, as the
/// scanner meters a stream cut off).
fn split(stream: &[u8]) -> (Vec<Event>, Event) {
    let mut events = Vec::new();
    let mut block = 0;
    let mut pos = if stream.starts_with(BOM) {
        BOM.len()
    } else {
        0
    };
    let mut data: Option<Vec<u8>> = None;
    while let Some(i) = stream[pos..].iter().position(|&b| b == b'\n' || b == b'\r') {
        let end = pos + i;
        let next = if stream[end] == b'\r' && stream.get(end + 1) == Some(&b'\n') {
            end + 2
        } else {
            end + 1
        };
        if end == pos {
            events.push(Event {
                range: block..next,
                data: data.take(),
            });
            block = next;
        } else {
            field(&stream[pos..end], &mut data);
        }
        pos = next;
    }
    if pos < stream.len() {
        field(&stream[pos..], &mut data);
    }
    let tail = Event {
        range: block..stream.len(),
        data,
    };
    (events, tail)
}

fn field(line: &[u8], data: &mut Option<Vec<u8>>) {
    if line.first() == Some(&b':') {
        return;
    }
    let (name, value) = match line.iter().position(|&b| b == b':') {
        Some(c) => (&line[..c], &line[c + 1..]),
        None => (line, &line[line.len()..]),
    };
    if name != b"data" {
        return;
    }
    let value = value.strip_prefix(b" ").unwrap_or(value);
    match data {
        None => *data = Some(value.to_vec()),
        Some(d) => {
            d.push(b'\n');
            d.extend_from_slice(value);
        }
    }
}

/// Top-level fields of a JSON object in order, duplicates kept.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// What an event's data means for metering: `Some((usage, usage_only))`, or None where the
/// answer depends on serde's treatment of input that is not JSON text (no UTF-8) or of
/// duplicate keys.
fn meaning(data: &[u8]) -> Option<(Option<Usage>, bool)> {
    let text = std::str::from_utf8(data).ok()?;
    let Ok(Entries(fields)) = serde_json::from_str::<Entries>(text) else {
        return Some((None, false));
    };
    let one = |name: &str| {
        let mut it = fields.iter().filter(|(k, _)| k == name).map(|(_, v)| *v);
        let first = it.next();
        if it.next().is_some() {
            Err(())
        } else {
            Ok(first)
        }
    };
    let (usage, choices) = (one("usage").ok()?, one("choices").ok()?);
    let Some(usage) = usage
        .filter(|u| u.get().starts_with('{'))
        .and_then(|u| serde_json::from_str::<UsageWire>(u.get()).ok())
        .map(|u| u.normalized())
    else {
        return Some((None, false));
    };
    let no_choices = match choices {
        None => true,
        Some(c) if c.get() == "null" => true,
        Some(c) => match serde_json::from_str::<Vec<IgnoredAny>>(c.get()) {
            Ok(v) => v.is_empty(),
            // Choices that are not a list: not a chunk the scanner reads usage from.
            Err(_) => return Some((None, false)),
        },
    };
    Some((Some(usage), no_choices))
}

/// Whether `out` is the events, each whole or left out as `keep` says (None: either), then
/// the tail; or, for a stream ended by an error, the events of some prefix without the tail.
fn forwarded_as_expected(
    stream: &[u8],
    events: &[Event],
    keep: &[Option<bool>],
    tail: &Range<usize>,
    out: &[u8],
    complete: bool,
) -> bool {
    let mut reach = BTreeSet::from([0usize]);
    if !complete && out.is_empty() {
        return true;
    }
    for (ev, keep) in events.iter().zip(keep) {
        let bytes = &stream[ev.range.clone()];
        let mut next = BTreeSet::new();
        for &p in &reach {
            if *keep != Some(true) {
                next.insert(p);
            }
            if *keep != Some(false) && out[p..].starts_with(bytes) {
                next.insert(p + bytes.len());
            }
        }
        reach = next;
        if !complete && reach.contains(&out.len()) {
            return true;
        }
    }
    complete && reach.iter().any(|&p| out[p..] == stream[tail.clone()])
}

fuzz_target!(|input: &[u8]| {
    let [flags, seed, stream @ ..] = input else {
        return;
    };
    let strip = flags & 1 == 1;
    let max = LIMITS[usize::from((flags >> 1) & 7)];
    let cap = CHUNKS[usize::from(flags >> 4)];

    let whole = run(stream, &cut(stream.len(), 0, 0), strip, max);
    let chunks = cut(stream.len(), cap, *seed);
    let cut_run = run(stream, &chunks, strip, max);

    let (events, tail) = split(stream);
    let meanings: Vec<_> = events
        .iter()
        .map(|e| e.data.as_deref().map_or(Some((None, false)), meaning))
        .collect();
    let keep: Vec<Option<bool>> = meanings
        .iter()
        .map(|m| match m {
            _ if !strip => Some(true),
            Some((_, usage_only)) => Some(!usage_only),
            None => None,
        })
        .collect();

    for r in [&whole, &cut_run] {
        let complete = r.error.is_none();
        assert!(
            forwarded_as_expected(stream, &events, &keep, &tail.range, &r.out, complete),
            "forwarded bytes are not the stream's events as expected (strip {strip}, limit {max}, error {:?}):\n{:?}",
            r.error,
            String::from_utf8_lossy(&r.out)
        );
        if let Some(e) = &r.error {
            let ScanError::EventTooLarge { limit } = e else {
                panic!("the scanner alone fails only on size: {e}");
            };
            assert_eq!(*limit, max);
            if !strip {
                assert!(
                    r.fed - r.out.len() > max,
                    "stopped with {} bytes held, limit {max}",
                    r.fed - r.out.len()
                );
            }
        }
    }

    if whole.error.is_none() && cut_run.error.is_none() {
        assert_eq!(
            String::from_utf8_lossy(&cut_run.out),
            String::from_utf8_lossy(&whole.out),
            "cut into {} chunks of at most {cap} bytes (seed {seed})",
            chunks.len()
        );
        assert_eq!(
            cut_run.out,
            whole.out,
            "cut into {} chunks of at most {cap} bytes (seed {seed})",
            chunks.len()
        );
        assert_eq!(
            cut_run.reports,
            whole.reports,
            "cut into {} chunks of at most {cap} bytes (seed {seed})",
            chunks.len()
        );

        // The last usage the stream carries is the last one metered.
        let tail_meaning = tail.data.as_deref().map_or(Some((None, false)), meaning);
        let all: Option<Vec<_>> = meanings.iter().cloned().chain([tail_meaning]).collect();
        if let Some(all) = all {
            let expected = all.iter().rev().find_map(|(u, _)| *u);
            let metered = whole.reports.iter().rev().find_map(|r| match r {
                Report::Usage(u) => Some(*u),
                _ => None,
            });
            assert_eq!(metered, expected, "the usage metered");
        }
    }
});
