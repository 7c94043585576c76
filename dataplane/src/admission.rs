//! Admission: per-key rate limits, concurrency and budgets, reserved up front.
//!
//! A request reserves its estimated tokens (prompt estimate + `max_tokens` or the default)
//! when it is admitted and settles to the real usage when it completes. Reservation and check
//! happen under one short lock, so any number of concurrent requests cannot together pass a
//! limit: the sum of reservations never exceeds it.
//!
//! Minute limits use a sliding window of sixty one-second slots: over any sixty whole seconds
//! the admitted amount stays within the limit. Budgets count per UTC day or month.
//!
//! `KeyState` outlives snapshots (it is keyed by `namespace/name` in the `StateRegistry`), so a
//! reload or a spec edit never resets usage.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

use crate::config::{BudgetPeriod, BudgetSpec};
use crate::keys::Key;
use crate::snapshot::StateRegistry;

const WINDOW: u64 = 60;

/// Sixty one-second slots with a running total. Moving to a new second clears the slots
/// that fell out of the window, so reading the total is O(1).
#[derive(Debug, Clone)]
struct Window {
    slots: [u64; WINDOW as usize],
    total: u64,
    /// The newest second the window has moved to.
    head: u64,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            slots: [0; WINDOW as usize],
            total: 0,
            head: 0,
        }
    }
}

impl Window {
    fn advance(&mut self, now: u64) {
        if now <= self.head {
            return;
        }
        let gap = (now - self.head).min(WINDOW);
        for i in 1..=gap {
            let slot = &mut self.slots[((self.head + i) % WINDOW) as usize];
            self.total -= *slot;
            *slot = 0;
        }
        self.head = now;
    }

    /// The amount of second `now - age`, if that second is in the window.
    fn at(&self, now: u64, age: u64) -> u64 {
        if age > now {
            return 0;
        }
        self.slots[((now - age) % WINDOW) as usize]
    }

    fn used(&mut self, now: u64) -> u64 {
        self.advance(now);
        self.total
    }

    fn add(&mut self, now: u64, amount: u64) {
        self.advance(now);
        self.slots[(now % WINDOW) as usize] += amount;
        self.total += amount;
    }

    /// Move a reservation made at `sec` to the real amount. Usage above the reservation is
    /// charged now if the original second already left the window.
    fn settle(&mut self, sec: u64, reserved: u64, actual: u64, now: u64) {
        self.advance(now);
        let now = now.max(self.head);
        if now.saturating_sub(sec) < WINDOW {
            let slot = &mut self.slots[(sec % WINDOW) as usize];
            let new = slot.saturating_sub(reserved).saturating_add(actual);
            self.total = self.total - *slot + new;
            *slot = new;
        } else if actual > reserved {
            self.add(now, actual - reserved);
        }
    }

    /// Seconds until at least `need` of the current usage has left the window.
    fn wait_for(&self, now: u64, need: u64) -> u64 {
        let mut freed = 0;
        for age in (0..WINDOW).rev() {
            freed += self.at(now, age);
            if freed >= need && freed > 0 {
                return WINDOW - age;
            }
        }
        WINDOW
    }

    /// Seconds until the oldest usage in the window expires (the `x-ratelimit-reset-*` value).
    fn reset_in(&self, now: u64) -> u64 {
        (0..WINDOW)
            .rev()
            .find(|age| self.at(now, *age) > 0)
            .map_or(0, |age| WINDOW - age)
    }
}

#[derive(Debug, Default)]
struct Budget {
    period: u64,
    tokens: u64,
    usd: f64,
    reserved_tokens: u64,
    reserved_usd: f64,
}

#[derive(Debug, Default)]
struct Counters {
    /// Allocated only for keys with that limit: most keys of a large fleet have none.
    requests: Option<Box<Window>>,
    tokens: Option<Box<Window>>,
    budget: Budget,
    unreported: Unreported,
}

/// Usage not yet reported to the operator.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Unreported {
    pub tokens: u64,
    pub usd: f64,
    /// Unix seconds of the last request.
    pub last_used: u64,
}

/// The live counters of one key.
#[derive(Debug, Default)]
pub struct KeyState {
    counters: Mutex<Counters>,
    in_flight: AtomicU32,
}

impl KeyState {
    /// Take the usage since the last report (None when there was no request).
    pub fn take_unreported(&self) -> Option<Unreported> {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let u = std::mem::take(&mut c.unreported);
        (u.last_used != 0).then_some(u)
    }

    /// Put back usage whose report failed, to send it with the next one.
    pub fn restore_unreported(&self, u: Unreported) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.unreported.tokens += u.tokens;
        c.unreported.usd += u.usd;
        c.unreported.last_used = c.unreported.last_used.max(u.last_used);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
    Budget,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests_per_minute",
            Self::Tokens => "tokens_per_minute",
            Self::Concurrency => "max_concurrent",
            Self::Budget => "budget",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rejection {
    pub kind: LimitKind,
    pub retry_after: Duration,
    pub message: String,
}

/// What a request expects to use, reserved at admission.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimate {
    pub tokens: u64,
    pub usd: f64,
}

/// An admitted request's reservation. Settle it with the real usage; dropping it unsettled
/// releases the token reservation (the request did not reach a model).
#[derive(Debug)]
pub struct Ticket {
    state: Arc<KeyState>,
    second: u64,
    period: u64,
    reserved: Estimate,
    holds_slot: bool,
    settled: bool,
    pub headers: Vec<(&'static str, HeaderValue)>,
}

impl Ticket {
    pub fn settle(mut self, tokens: u64, usd: f64) {
        self.finish(tokens, usd);
    }

    fn finish(&mut self, tokens: u64, usd: f64) {
        if self.settled {
            return;
        }
        self.settled = true;
        if self.holds_slot {
            self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        let now = unix_now();
        let mut c = self
            .state
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(w) = c.tokens.as_mut() {
            w.settle(self.second, self.reserved.tokens, tokens, now);
        }
        let b = &mut c.budget;
        if b.period == self.period {
            b.reserved_tokens = b.reserved_tokens.saturating_sub(self.reserved.tokens);
            b.reserved_usd = (b.reserved_usd - self.reserved.usd).max(0.0);
        }
        b.tokens = b.tokens.saturating_add(tokens);
        b.usd += usd;
        c.unreported.tokens += tokens;
        c.unreported.usd += usd;
        c.unreported.last_used = now;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.finish(0, 0.0);
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Days since 1970-01-01 → (year, month 1..=12, day). Howard Hinnant's civil_from_days.
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (period id, seconds until the period ends) for a budget period at `now`.
pub fn budget_period(period: BudgetPeriod, now: u64) -> (u64, u64) {
    let days = (now / 86_400) as i64;
    match period {
        BudgetPeriod::Day => (days as u64, (days as u64 + 1) * 86_400 - now),
        BudgetPeriod::Month => {
            let (y, m, _) = civil(days);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let next = days_from_civil(ny, nm, 1) as u64 * 86_400;
            ((y * 12 + i64::from(m)) as u64, next.saturating_sub(now))
        }
    }
}

fn header_num(v: u64) -> HeaderValue {
    HeaderValue::from(v)
}

fn header_secs(s: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("{s}s")).unwrap_or(HeaderValue::from_static("0s"))
}

/// Admit one request of `key` expecting `est`, or say which limit refuses it and for how long.
pub fn admit(
    key: &Key,
    registry: &StateRegistry,
    est: Estimate,
    now: u64,
) -> Result<Ticket, Rejection> {
    let state = key.state(registry);
    let limits = &key.limits;
    let mut holds_slot = false;
    if let Some(max) = limits.max_concurrent {
        let prev = state.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejection {
                kind: LimitKind::Concurrency,
                retry_after: Duration::from_secs(1),
                message: format!("this key may have at most {max} requests in flight"),
            });
        }
        holds_slot = true;
    }
    let release = |state: &KeyState| {
        if holds_slot {
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    };

    let mut c = state.counters.lock().unwrap_or_else(|e| e.into_inner());
    let mut headers = Vec::new();
    if let Some(rpm) = limits.requests_per_minute {
        let w = c.requests.get_or_insert_with(Box::default);
        let used = w.used(now);
        if used + 1 > rpm {
            let wait = w.wait_for(now, used + 1 - rpm);
            drop(c);
            release(state);
            return Err(Rejection {
                kind: LimitKind::Requests,
                retry_after: Duration::from_secs(wait.max(1)),
                message: format!(
                    "rate limit of {rpm} requests per minute reached; retry in {wait}s"
                ),
            });
        }
        headers.push(("x-ratelimit-limit-requests", header_num(rpm)));
        headers.push(("x-ratelimit-remaining-requests", header_num(rpm - used - 1)));
    }
    if let Some(tpm) = limits.tokens_per_minute {
        let w = c.tokens.get_or_insert_with(Box::default);
        let used = w.used(now);
        if est.tokens > tpm {
            drop(c);
            release(state);
            return Err(Rejection {
                kind: LimitKind::Tokens,
                retry_after: Duration::from_secs(WINDOW),
                message: format!(
                    "request needs up to {} tokens (prompt + max_tokens) but the limit is {tpm} tokens per minute; lower max_tokens",
                    est.tokens
                ),
            });
        }
        if used + est.tokens > tpm {
            let wait = w.wait_for(now, used + est.tokens - tpm);
            drop(c);
            release(state);
            return Err(Rejection {
                kind: LimitKind::Tokens,
                retry_after: Duration::from_secs(wait.max(1)),
                message: format!(
                    "rate limit of {tpm} tokens per minute reached ({used} used or reserved, {} requested); retry in {wait}s",
                    est.tokens
                ),
            });
        }
        headers.push(("x-ratelimit-limit-tokens", header_num(tpm)));
        headers.push((
            "x-ratelimit-remaining-tokens",
            header_num(tpm - used - est.tokens),
        ));
    }
    let mut period = 0;
    if let Some(budget) = &key.budget {
        let (id, ends_in) = budget_period(budget.period, now);
        period = id;
        let b = &mut c.budget;
        if b.period != id {
            *b = Budget {
                period: id,
                ..Budget::default()
            };
        }
        if let Some(msg) = over_budget(budget, b, est) {
            drop(c);
            release(state);
            return Err(Rejection {
                kind: LimitKind::Budget,
                retry_after: Duration::from_secs(ends_in.max(1)),
                message: msg,
            });
        }
        b.reserved_tokens += est.tokens;
        b.reserved_usd += est.usd;
    }
    if let Some(w) = c
        .requests
        .as_mut()
        .filter(|_| limits.requests_per_minute.is_some())
    {
        w.add(now, 1);
        headers.push(("x-ratelimit-reset-requests", header_secs(w.reset_in(now))));
    }
    if let Some(w) = c
        .tokens
        .as_mut()
        .filter(|_| limits.tokens_per_minute.is_some())
    {
        w.add(now, est.tokens);
        headers.push(("x-ratelimit-reset-tokens", header_secs(w.reset_in(now))));
    }
    drop(c);
    Ok(Ticket {
        state: state.clone(),
        second: now,
        period,
        reserved: est,
        holds_slot,
        settled: false,
        headers,
    })
}

fn over_budget(spec: &BudgetSpec, b: &Budget, est: Estimate) -> Option<String> {
    let period = match spec.period {
        BudgetPeriod::Day => "day",
        BudgetPeriod::Month => "month",
    };
    if let Some(max) = spec.tokens
        && b.tokens + b.reserved_tokens + est.tokens > max
    {
        return Some(format!(
            "token budget of {max} per {period} is used up ({} used, {} in flight, {} requested)",
            b.tokens, b.reserved_tokens, est.tokens
        ));
    }
    if let Some(max) = spec.usd
        && b.usd + b.reserved_usd + est.usd > max
    {
        return Some(format!(
            "budget of ${max:.2} per {period} is used up (${:.4} used, ${:.4} in flight)",
            b.usd, b.reserved_usd
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsSpec;
    use crate::keys::Key;

    fn key(limits: LimitsSpec, budget: Option<BudgetSpec>) -> Key {
        Key {
            id: "default/k".into(),
            namespace: "default".into(),
            models: Box::default(),
            limits,
            budget: budget.map(Box::new),
            expires_at: None,
            disabled: false,
            exhausted: false,
            state: std::sync::OnceLock::new(),
        }
    }

    fn est(tokens: u64) -> Estimate {
        Estimate { tokens, usd: 0.0 }
    }

    #[test]
    fn token_reservations_never_overshoot() {
        let k = key(
            LimitsSpec {
                tokens_per_minute: Some(1000),
                ..Default::default()
            },
            None,
        );
        let now = 1_000_000;
        let tickets: Vec<_> = (0..20)
            .filter_map(|_| admit(&k, &StateRegistry::default(), est(150), now).ok())
            .collect();
        assert_eq!(
            tickets.len(),
            6,
            "6 × 150 = 900 fits, a 7th would reach 1050"
        );
        let err = admit(&k, &StateRegistry::default(), est(150), now).unwrap_err();
        assert_eq!(err.kind, LimitKind::Tokens);
        assert_eq!(err.retry_after, Duration::from_secs(60));
        // Settling below the estimate frees room at once.
        for t in tickets {
            t.settle(50, 0.0);
        }
        assert!(admit(&k, &StateRegistry::default(), est(150), now).is_ok());
    }

    #[test]
    fn window_slides() {
        let k = key(
            LimitsSpec {
                requests_per_minute: Some(2),
                ..Default::default()
            },
            None,
        );
        let t0 = 5_000;
        admit(&k, &StateRegistry::default(), est(0), t0).unwrap();
        admit(&k, &StateRegistry::default(), est(0), t0 + 10).unwrap();
        let err = admit(&k, &StateRegistry::default(), est(0), t0 + 20).unwrap_err();
        assert_eq!(err.retry_after, Duration::from_secs(40));
        assert!(
            admit(&k, &StateRegistry::default(), est(0), t0 + 60).is_ok(),
            "first one left the window"
        );
    }

    #[test]
    fn concurrency_slots_are_released() {
        let k = key(
            LimitsSpec {
                max_concurrent: Some(1),
                ..Default::default()
            },
            None,
        );
        let t = admit(&k, &StateRegistry::default(), est(1), 1).unwrap();
        assert_eq!(
            admit(&k, &StateRegistry::default(), est(1), 1)
                .unwrap_err()
                .kind,
            LimitKind::Concurrency
        );
        drop(t);
        assert!(admit(&k, &StateRegistry::default(), est(1), 1).is_ok());
    }

    #[test]
    fn budgets_count_settled_and_reserved_usage() {
        let k = key(
            LimitsSpec::default(),
            Some(BudgetSpec {
                tokens: Some(100),
                usd: None,
                period: BudgetPeriod::Day,
            }),
        );
        let now = 86_400 * 10 + 5;
        let t = admit(&k, &StateRegistry::default(), est(60), now).unwrap();
        assert_eq!(
            admit(&k, &StateRegistry::default(), est(60), now)
                .unwrap_err()
                .kind,
            LimitKind::Budget
        );
        t.settle(90, 0.0);
        let err = admit(&k, &StateRegistry::default(), est(20), now).unwrap_err();
        assert_eq!(err.retry_after, Duration::from_secs(86_400 - 5));
        assert!(
            admit(&k, &StateRegistry::default(), est(20), now + 86_400).is_ok(),
            "a new day starts fresh"
        );
    }

    #[test]
    fn month_periods() {
        // 2026-11-27T06:00:00Z
        let now = 1_795_759_200;
        let (id, ends) = budget_period(BudgetPeriod::Month, now);
        assert_eq!(id, 2026 * 12 + 11);
        // 2026-12-01T00:00:00Z
        assert_eq!(now + ends, 1_796_083_200);
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }
}
