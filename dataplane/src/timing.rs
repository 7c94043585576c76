//! What the timing loops of the `bench` unit tests share (run by hand in release, e.g.
//! `cargo test -p modelgate-dataplane --release --lib translate::bench -- --ignored --nocapture`).

use std::time::Instant;

/// Calls per timed round: `MODELGATE_ROUNDS`, 100,000 without it.
pub fn rounds() -> usize {
    std::env::var("MODELGATE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100_000)
}

/// Nanoseconds per call of `f`: the fastest of five rounds of `rounds` calls.
pub fn best_of_five(rounds: usize, f: &dyn Fn()) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..rounds {
                f();
            }
            start.elapsed().as_nanos() as f64 / rounds as f64
        })
        .fold(f64::MAX, f64::min)
}
