//! The admission arithmetic: admit, settle and cancel in any order against any limits.
//!
//! The same invariants as the property test in `dataplane/src/admission.rs`, driven by the
//! fuzzer: each admission is granted exactly when a plain model of the limits (every
//! admission and every charge kept in a list, sums in u128) says it fits, so no limit is
//! ever exceeded while requests use no more than they reserved, and every slot and
//! reservation comes back (a leaked one would refuse a later admission the model grants).
//! A few operations with hostile amounts (any u64, NaN, infinite or negative dollars) only
//! have to not panic; the model stops judging after them, and after usage past u64 (where
//! the code saturates and the model does not).
//!
//! Only the crate's public API is used, so tickets settle at the wall clock. The simulated
//! clock runs ahead of it (from an hour into next month, as in the property test), where a
//! settlement counts at the newest second the token window has seen: the last admission
//! that got past the concurrency and request-rate checks. The model follows that.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use modelgate_dataplane::admission::{
    BudgetPeriod, BudgetRule, Estimate, Limits as KeyLimits, Ticket, admit, budget_period,
    unix_now,
};
use modelgate_dataplane::keys::Key;
use modelgate_dataplane::snapshot::StateRegistry;

const WINDOW: u64 = 60;

#[derive(Debug, Arbitrary)]
enum Tokens {
    Small(u16),
    NearMax(u16),
    Any(u64),
}

impl Tokens {
    fn get(&self) -> u64 {
        match *self {
            Self::Small(n) => u64::from(n % 400),
            Self::NearMax(n) => u64::MAX - u64::from(n % 1000),
            Self::Any(n) => n,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// Dollars in 1/64 (exact in f64, so model and code agree to the bit).
    Admit {
        tokens: Tokens,
        usd: u8,
    },
    Settle {
        which: u8,
        tokens: Tokens,
        usd: u8,
    },
    Cancel {
        which: u8,
    },
    Advance {
        secs: u8,
    },
    /// Amounts no model judges: only no panic.
    Wild {
        tokens: u64,
        usd: f64,
        settle_usd: f64,
    },
}

#[derive(Debug, Arbitrary)]
enum Limit {
    Small(u16),
    Any(u64),
}

impl Limit {
    /// At least 1 (a snapshot refuses 0) and below u64::MAX: sums saturate at u64::MAX,
    /// which never exceeds a limit of u64::MAX, so such a limit means no limit.
    fn get(&self, small: u64) -> u64 {
        match *self {
            Self::Small(n) => 1 + u64::from(n) % small,
            Self::Any(n) => n.clamp(1, u64::MAX - 1),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    rpm: Option<Limit>,
    tpm: Option<Limit>,
    concurrent: Option<u8>,
    budget_tokens: Option<Limit>,
    /// Dollars in 1/8.
    budget_eighths: Option<u8>,
    daily: bool,
    ops: Vec<Op>,
}

fn dollars(sixty_fourths: u8) -> f64 {
    f64::from(sixty_fourths % 64) / 64.0
}

struct Open {
    ticket: Ticket,
    second: u64,
    tokens: u64,
    usd: f64,
    /// Index of its charge in `Model::charges`, when a token limit is set.
    charge: Option<usize>,
}

/// What the limits mean, kept the simple way.
#[derive(Default)]
struct Model {
    /// Seconds of admitted requests.
    requests: Vec<u64>,
    /// (second, tokens) charged to the minute window.
    charges: Vec<(u64, u64)>,
    budget_tokens: u128,
    budget_usd: f64,
    /// Newest second the token window has moved to.
    head: u64,
}

fn in_window(now: u64, sec: u64) -> bool {
    sec <= now && now - sec < WINDOW
}

impl Model {
    fn requests_in_window(&self, now: u64) -> u64 {
        self.requests.iter().filter(|s| in_window(now, **s)).count() as u64
    }

    fn tokens_in_window(&self, now: u64) -> u128 {
        self.charges
            .iter()
            .filter(|(s, _)| in_window(now, *s))
            .map(|(_, t)| u128::from(*t))
            .sum()
    }

    /// Whether a count went past u64: the code saturates there (the window total stays
    /// exact), so after usage that large, beyond any reservation, the two may differ.
    fn beyond_u64(&self, now: u64) -> bool {
        let mut per_second = std::collections::BTreeMap::<u64, u128>::new();
        for (s, t) in &self.charges {
            *per_second.entry(*s).or_default() += u128::from(*t);
        }
        let max = u128::from(u64::MAX);
        per_second.values().any(|t| *t > max)
            || self.tokens_in_window(now) > max
            || self.budget_tokens > max
    }
}

struct Limits {
    rpm: Option<u64>,
    tpm: Option<u64>,
    concurrent: Option<u32>,
    budget_tokens: Option<u64>,
    budget_usd: Option<f64>,
}

impl Limits {
    /// (whether the admission fits, whether it reaches the token window).
    fn judge(&self, m: &Model, open: &[Open], now: u64, tokens: u64, usd: f64) -> (bool, bool) {
        let reserved_tokens: u128 = open.iter().map(|o| u128::from(o.tokens)).sum();
        let reserved_usd: f64 = open.iter().map(|o| o.usd).sum();
        let concurrency = self.concurrent.is_none_or(|c| (open.len() as u32) < c);
        let rpm = self.rpm.is_none_or(|r| m.requests_in_window(now) < r);
        let tpm = self
            .tpm
            .is_none_or(|t| m.tokens_in_window(now) + u128::from(tokens) <= u128::from(t));
        let budget_tokens = self.budget_tokens.is_none_or(|b| {
            m.budget_tokens + reserved_tokens + u128::from(tokens) <= u128::from(b)
        });
        let budget_usd = self
            .budget_usd
            .is_none_or(|b| m.budget_usd + reserved_usd + usd <= b);
        (
            concurrency && rpm && tpm && budget_tokens && budget_usd,
            concurrency && rpm && self.tpm.is_some(),
        )
    }
}

fuzz_target!(|input: Input| {
    let limits = Limits {
        rpm: input.rpm.as_ref().map(|l| l.get(20)),
        tpm: input.tpm.as_ref().map(|l| l.get(2000)),
        concurrent: input.concurrent.map(|c| 1 + u32::from(c % 6)),
        budget_tokens: input.budget_tokens.as_ref().map(|l| l.get(5000)),
        budget_usd: input
            .budget_eighths
            .map(|e| f64::from(1 + u32::from(e % 80)) / 8.0),
    };
    let period = if input.daily {
        BudgetPeriod::Day
    } else {
        BudgetPeriod::Month
    };
    let key = Key {
        id: "default/fuzz".into(),
        namespace: "default".into(),
        models: Box::default(),
        limits: KeyLimits {
            requests_per_minute: limits.rpm,
            tokens_per_minute: limits.tpm,
            max_concurrent: limits.concurrent,
        },
        budget: (limits.budget_tokens.is_some() || limits.budget_usd.is_some()).then(|| {
            Box::new(BudgetRule {
                tokens: limits.budget_tokens,
                usd: limits.budget_usd,
                period,
            })
        }),
        expires_at: None,
        disabled: false,
        exhausted: false,
        max_cost_per_request: None,
        state: std::sync::OnceLock::new(),
    };
    let reg = StateRegistry::default();
    // An hour into next month: ahead of the wall clock that tickets settle at, and 255 ops
    // of at most 255 s stay within one budget period (a day or a month).
    let wall = unix_now();
    let mut now = wall + budget_period(BudgetPeriod::Month, wall).1 + 3600;
    let mut model = Model::default();
    let mut open: Vec<Open> = Vec::new();
    // While no request used more than it reserved, the limits hold at every moment.
    let mut overused = false;
    // After a wild operation the model no longer knows the state.
    let mut judged = true;

    for op in input.ops.iter().take(255) {
        match op {
            Op::Advance { secs } => now += u64::from(*secs),
            Op::Admit { tokens, usd } => {
                let (tokens, usd) = (tokens.get(), dollars(*usd));
                let (fits, reaches_window) = limits.judge(&model, &open, now, tokens, usd);
                let got = admit(&key, &reg, Estimate { tokens, usd }, now);
                if judged {
                    assert_eq!(
                        got.is_ok(),
                        fits,
                        "admit {tokens} tokens ${usd} at {now}: {:?}",
                        got.as_ref().err()
                    );
                }
                if reaches_window {
                    model.head = now;
                }
                if let Ok(ticket) = got {
                    model.requests.push(now);
                    let charge = limits.tpm.map(|_| {
                        model.charges.push((now, tokens));
                        model.charges.len() - 1
                    });
                    open.push(Open {
                        ticket,
                        second: now,
                        tokens,
                        usd,
                        charge,
                    });
                }
            }
            Op::Settle { which, tokens, usd } if !open.is_empty() => {
                let o = open.swap_remove(usize::from(*which) % open.len());
                let (tokens, usd) = (tokens.get(), dollars(*usd));
                overused |= tokens > o.tokens || usd > o.usd;
                if let Some(i) = o.charge {
                    if in_window(model.head, o.second) {
                        model.charges[i].1 = tokens;
                    } else if tokens > o.tokens {
                        model.charges.push((model.head, tokens - o.tokens));
                    }
                }
                model.budget_tokens += u128::from(tokens);
                model.budget_usd += usd;
                o.ticket.settle(tokens, usd);
            }
            Op::Cancel { which } if !open.is_empty() => {
                let o = open.swap_remove(usize::from(*which) % open.len());
                if let Some(i) = o.charge
                    && in_window(model.head, o.second)
                {
                    model.charges[i].1 = 0;
                }
                // The real path: the ticket is dropped unsettled.
                drop(o.ticket);
            }
            Op::Settle { .. } | Op::Cancel { .. } => {}
            Op::Wild {
                tokens,
                usd,
                settle_usd,
            } => {
                judged = false;
                if let Ok(t) = admit(
                    &key,
                    &reg,
                    Estimate {
                        tokens: *tokens,
                        usd: *usd,
                    },
                    now,
                ) {
                    for (name, value) in &t.headers {
                        assert!(!name.is_empty() && !value.is_empty());
                    }
                    t.settle(*tokens, *settle_usd);
                }
            }
        }
        if judged && model.beyond_u64(now.max(model.head)) {
            judged = false;
        }
        if !judged {
            continue;
        }

        // No limit is exceeded.
        if let Some(c) = limits.concurrent {
            assert!(open.len() as u32 <= c);
        }
        if let Some(r) = limits.rpm {
            assert!(model.requests_in_window(now) <= r);
        }
        if !overused {
            let reserved: u128 = open.iter().map(|o| u128::from(o.tokens)).sum();
            if let Some(t) = limits.tpm {
                assert!(model.tokens_in_window(now) <= u128::from(t));
            }
            if let Some(b) = limits.budget_tokens {
                assert!(model.budget_tokens + reserved <= u128::from(b));
            }
            if let Some(b) = limits.budget_usd {
                let reserved_usd: f64 = open.iter().map(|o| o.usd).sum();
                assert!(model.budget_usd + reserved_usd <= b);
            }
        }
    }

    // Every reservation comes back: once all tickets are gone and a minute has passed, an
    // admission is judged by what was used alone.
    if judged {
        for o in open.drain(..) {
            if let Some(i) = o.charge
                && in_window(model.head, o.second)
            {
                model.charges[i].1 = 0;
            }
            drop(o.ticket);
        }
        let later = now.max(model.head) + WINDOW;
        for tokens in [0, 1, limits.tpm.unwrap_or(1)] {
            let (fits, _) = limits.judge(&model, &[], later, tokens, 0.0);
            let got = admit(&key, &reg, Estimate { tokens, usd: 0.0 }, later);
            assert_eq!(
                got.is_ok(),
                fits,
                "after all tickets are gone: {tokens} tokens"
            );
            if let Ok(t) = got {
                t.settle(0, 0.0);
                model.requests.push(later);
            }
        }
    }
});
