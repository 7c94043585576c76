//! The Redis tier's RESP2 reader: whatever a (hostile) Redis sends, reading one reply never
//! panics, never takes a bulk string above its bound, and reads the same reply whether the
//! bytes came at once or one more byte at a time (it only ever asks for more, or decides).
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::cache::{Reply, parse_reply};

fuzz_target!(|input: &[u8]| {
    let [bound, bytes @ ..] = input else {
        return;
    };
    let max = usize::from(*bound) * 4;
    let whole = parse_reply(bytes, max);
    if let Ok(Some((reply, used))) = &whole {
        assert!(*used <= bytes.len());
        if let Reply::Bulk(Some(b)) = reply {
            assert!(b.len() <= max);
        }
    }
    // Any prefix either needs more bytes or reads what the whole input reads.
    for cut in 0..bytes.len().min(64) {
        match parse_reply(&bytes[..cut], max) {
            Ok(None) => {}
            got => {
                assert_eq!(got, whole, "a prefix of {cut} bytes read differently");
            }
        }
    }
});
