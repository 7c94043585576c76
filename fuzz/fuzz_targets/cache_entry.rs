//! A response-cache entry read back from Redis, which anything that can write to Redis may
//! have written: decoding never panics, never allocates past its bound, and an entry it
//! accepts encodes back to the same bytes (the format has one spelling per entry).
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::cache::Entry;

const MAX_BODY: usize = 1 << 16;

fuzz_target!(|input: &[u8]| {
    if let Ok(entry) = Entry::decode(input, MAX_BODY) {
        assert!(entry.body.len() <= MAX_BODY);
        assert!(entry.cost_usd.is_finite() && entry.cost_usd >= 0.0);
        assert!(
            entry
                .content_type
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b)),
            "a content type that is a valid header value"
        );
        assert_eq!(entry.encode(), input, "one spelling per entry");
    }
});
