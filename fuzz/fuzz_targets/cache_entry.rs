//! A response-cache entry read back from Redis, which anything that can write to Redis may
//! have written: decoding never panics, never allocates past its bound, and an entry it
//! accepts encodes back to the same bytes (the format has one spelling per entry). Opening it
//! as a sealed entry never panics and never accepts bytes that were not sealed with the key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

use modelgate_dataplane::cache::{Entry, Sealer};

const MAX_BODY: usize = 1 << 16;

static SEALER: LazyLock<Sealer> =
    LazyLock::new(|| Sealer::from_secret(b"fuzz-entry-key-0123456789abcdef01").unwrap());

fuzz_target!(|input: &[u8]| {
    assert!(
        SEALER.open(b"mg:cache:fuzz", input).is_err(),
        "a forged seal was accepted"
    );
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
