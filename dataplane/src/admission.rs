//! Admission: per-key rate limits, concurrency and budgets, reserved up front.
//!
//! A request reserves its estimated tokens (prompt estimate + the larger of `max_tokens` and
//! `max_completion_tokens`, or the default, times the choices it asks for) when it is
//! admitted and settles to the real usage when it completes. Reservation and check happen
//! under one short lock, so any number of concurrent requests cannot together pass a limit:
//! the sum of reservations never exceeds it.
//!
//! Minute limits use a sliding window of sixty one-second slots: over any sixty whole seconds
//! the admitted amount stays within the limit. Budgets count per UTC day or month.
//!
//! `KeyState` outlives snapshots (it is keyed by `namespace/name` in the `StateRegistry`), so a
//! reload or a spec edit never resets usage.
//!
//! Every amount here can come from a client (`max_tokens`) or an upstream (reported usage),
//! so all token arithmetic saturates: a huge value is refused by a limit, never wrapped past
//! it. Everything raised is lowered by a guard: a [`Ticket`] (and the concurrency slot it
//! holds) gives its reservation back when dropped, whichever way the request ends.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;

use crate::keys::Key;
use crate::snapshot::StateRegistry;

pub use modelgate_wire::BudgetPeriod;
#[cfg(test)]
use modelgate_wire::clock::days_from_civil;
pub use modelgate_wire::clock::{budget_period, civil, unix_now};

/// A key's rate limits, as admission reads them (serialized only for `/config`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

/// A key's spending cap per budget period.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetRule {
    pub tokens: Option<u64>,
    pub usd: Option<f64>,
    pub period: BudgetPeriod,
}

const WINDOW: u64 = 60;

/// Sixty one-second slots with a running total. Moving to a new second clears the slots
/// that fell out of the window, so reading the total is O(1).
#[derive(Debug, Clone)]
struct Window {
    slots: [u64; WINDOW as usize],
    /// Sum of the slots. Wide enough that it never saturates: a saturated total would drop
    /// below the slots' real sum once a huge slot leaves the window.
    total: u128,
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
            let slot = &mut self.slots[(self.head.wrapping_add(i) % WINDOW) as usize];
            self.total -= u128::from(*slot);
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
        u64::try_from(self.total).unwrap_or(u64::MAX)
    }

    fn add(&mut self, now: u64, amount: u64) {
        self.advance(now);
        let slot = &mut self.slots[(now % WINDOW) as usize];
        let new = slot.saturating_add(amount);
        self.total += u128::from(new - *slot);
        *slot = new;
    }

    /// Move a reservation made at `sec` to the real amount. Usage above the reservation is
    /// charged now if the original second already left the window.
    fn settle(&mut self, sec: u64, reserved: u64, actual: u64, now: u64) {
        self.advance(now);
        let now = now.max(self.head);
        if now.saturating_sub(sec) < WINDOW {
            let slot = &mut self.slots[(sec % WINDOW) as usize];
            let new = slot.saturating_sub(reserved).saturating_add(actual);
            self.total = self.total - u128::from(*slot) + u128::from(new);
            *slot = new;
        } else if actual > reserved {
            self.add(now, actual - reserved);
        }
    }

    /// Seconds until at least `need` of the current usage has left the window.
    fn wait_for(&self, now: u64, need: u64) -> u64 {
        let mut freed: u64 = 0;
        for age in (0..WINDOW).rev() {
            freed = freed.saturating_add(self.at(now, age));
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

    /// Take in what the whole fleet spent on this key in budget period `period` (from the
    /// operator, which sums every proxy's reports): the larger of it and this proxy's own
    /// count wins. A restarted proxy so starts from the fleet's figure, and nothing this proxy
    /// already counted is counted twice (the fleet's figure includes what it reported).
    /// Figures for a period that is not the current day or month are ignored.
    pub fn seed_budget(&self, period: u64, tokens: u64, usd: f64, now: u64) {
        let current = [BudgetPeriod::Day, BudgetPeriod::Month]
            .iter()
            .any(|p| budget_period(*p, now).0 == period);
        if !current {
            return;
        }
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut c.budget;
        if b.period != period {
            *b = Budget {
                period,
                ..Budget::default()
            };
        }
        b.tokens = b.tokens.max(tokens);
        if usd.is_finite() && usd > b.usd {
            b.usd = usd;
        }
    }

    /// Put back usage whose report failed, to send it with the next one.
    pub fn restore_unreported(&self, u: Unreported) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.unreported.tokens = c.unreported.tokens.saturating_add(u.tokens);
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

/// Whose `maxCostPerRequest` refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendGuard {
    Route,
    Key,
}

impl SpendGuard {
    /// The `limit` label of `modelgate_limit_rejections_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Route => "route_max_cost_per_request",
            Self::Key => "key_max_cost_per_request",
        }
    }

    /// Whose guard it is, in an error message.
    pub fn owner(self) -> &'static str {
        match self {
            Self::Route => "the route's",
            Self::Key => "this API key's",
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

/// A `maxConcurrent` slot of one key, taken at admission. Dropping it gives the slot back,
/// so no path (an early rejection, a panic, a client leaving mid-call) can leak one.
#[derive(Debug)]
struct Slot(Arc<KeyState>);

impl Slot {
    /// Take a slot if fewer than `max` are taken. Never counts past `max`, not even for a
    /// moment, so a refused request cannot make a concurrent one fail.
    fn take(state: &Arc<KeyState>, max: u32) -> Option<Self> {
        state
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(state.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An admitted request's reservation. Settle it with the real usage; dropping it unsettled
/// releases the token reservation (the request did not reach a model).
#[derive(Debug)]
pub struct Ticket {
    state: Arc<KeyState>,
    second: u64,
    period: u64,
    reserved: Estimate,
    slot: Option<Slot>,
    settled: bool,
    pub headers: Vec<(&'static str, HeaderValue)>,
}

impl Ticket {
    pub fn settle(mut self, tokens: u64, usd: f64) {
        self.finish(tokens, usd, unix_now());
    }

    fn finish(&mut self, tokens: u64, usd: f64, now: u64) {
        if self.settled {
            return;
        }
        self.settled = true;
        drop(self.slot.take());
        let usd = if usd.is_finite() { usd.max(0.0) } else { 0.0 };
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
        c.unreported.tokens = c.unreported.tokens.saturating_add(tokens);
        c.unreported.usd += usd;
        c.unreported.last_used = now;
    }
}

#[cfg(test)]
impl Ticket {
    /// Settle as if at `now` (the wall clock otherwise).
    fn settle_at(mut self, tokens: u64, usd: f64, now: u64) {
        self.finish(tokens, usd, now);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.finish(0, 0.0, unix_now());
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
    let est = Estimate {
        tokens: est.tokens,
        usd: if est.usd.is_finite() {
            est.usd.max(0.0)
        } else {
            f64::MAX
        },
    };
    // Early returns below drop the slot, which gives it back.
    let slot = match limits.max_concurrent {
        None => None,
        Some(max) => Some(Slot::take(state, max).ok_or_else(|| Rejection {
            kind: LimitKind::Concurrency,
            retry_after: Duration::from_secs(1),
            message: format!("this key may have at most {max} requests in flight"),
        })?),
    };

    let mut c = state.counters.lock().unwrap_or_else(|e| e.into_inner());
    let mut headers = Vec::new();
    if let Some(rpm) = limits.requests_per_minute {
        let w = c.requests.get_or_insert_with(Box::default);
        let used = w.used(now);
        if used.saturating_add(1) > rpm {
            let wait = w.wait_for(now, used.saturating_add(1) - rpm);
            return Err(Rejection {
                kind: LimitKind::Requests,
                retry_after: Duration::from_secs(wait.max(1)),
                message: format!(
                    "rate limit of {rpm} requests per minute reached; retry in {wait}s"
                ),
            });
        }
        headers.push(("x-ratelimit-limit-requests", header_num(rpm)));
        headers.push((
            "x-ratelimit-remaining-requests",
            header_num(rpm.saturating_sub(used).saturating_sub(1)),
        ));
    }
    if let Some(tpm) = limits.tokens_per_minute {
        let w = c.tokens.get_or_insert_with(Box::default);
        let used = w.used(now);
        if est.tokens > tpm {
            return Err(Rejection {
                kind: LimitKind::Tokens,
                retry_after: Duration::from_secs(WINDOW),
                message: format!(
                    "request needs up to {} tokens (prompt + max_tokens × choices) but the limit is {tpm} tokens per minute; lower max_tokens",
                    est.tokens
                ),
            });
        }
        let wanted = used.saturating_add(est.tokens);
        if wanted > tpm {
            let wait = w.wait_for(now, wanted - tpm);
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
        headers.push(("x-ratelimit-remaining-tokens", header_num(tpm - wanted)));
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
            return Err(Rejection {
                kind: LimitKind::Budget,
                retry_after: Duration::from_secs(ends_in.max(1)),
                message: msg,
            });
        }
        b.reserved_tokens = b.reserved_tokens.saturating_add(est.tokens);
        b.reserved_usd = (b.reserved_usd + est.usd).min(f64::MAX);
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
        slot,
        settled: false,
        headers,
    })
}

fn over_budget(spec: &BudgetRule, b: &Budget, est: Estimate) -> Option<String> {
    let period = match spec.period {
        BudgetPeriod::Day => "day",
        BudgetPeriod::Month => "month",
    };
    if let Some(max) = spec.tokens
        && b.tokens
            .saturating_add(b.reserved_tokens)
            .saturating_add(est.tokens)
            > max
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

    use crate::keys::Key;

    fn key(limits: Limits, budget: Option<BudgetRule>) -> Key {
        Key {
            id: "default/k".into(),
            namespace: "default".into(),
            models: Box::default(),
            limits,
            budget: budget.map(Box::new),
            expires_at: None,
            disabled: false,
            exhausted: false,
            max_cost_per_request: None,
            state: std::sync::OnceLock::new(),
        }
    }

    fn est(tokens: u64) -> Estimate {
        Estimate { tokens, usd: 0.0 }
    }

    #[test]
    fn token_reservations_never_overshoot() {
        let k = key(
            Limits {
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
            Limits {
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
            Limits {
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
            Limits::default(),
            Some(BudgetRule {
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
    #[test]
    fn a_seeded_budget_counts_from_the_fleets_figure_and_never_twice() {
        let k = key(
            Limits::default(),
            Some(BudgetRule {
                tokens: Some(200),
                usd: None,
                period: BudgetPeriod::Day,
            }),
        );
        let registry = StateRegistry::default();
        let now = unix_now();
        let (day, _) = budget_period(BudgetPeriod::Day, now);
        let est = |tokens| Estimate { tokens, usd: 0.0 };
        // This proxy spent 30 itself; the fleet (which includes those 30) spent 165.
        admit(&k, &registry, est(30), now).unwrap().settle(30, 0.0);
        let state = k.state(&registry);
        state.seed_budget(day, 165, 0.0, now);
        assert!(
            admit(&k, &registry, est(36), now).is_err(),
            "165 + 36 > 200"
        );
        admit(&k, &registry, est(35), now).unwrap().settle(35, 0.0);
        // An older fleet figure never lowers the count; one for another period is ignored.
        state.seed_budget(day, 100, 0.0, now);
        state.seed_budget(day - 3, 10_000, 0.0, now);
        assert!(
            admit(&k, &registry, est(1), now).is_err(),
            "200 of 200 used"
        );
    }

    #[test]
    fn huge_reservations_are_refused_not_wrapped() {
        let k = key(
            Limits {
                requests_per_minute: Some(u64::MAX),
                tokens_per_minute: Some(1000),
                ..Default::default()
            },
            Some(BudgetRule {
                tokens: Some(u64::MAX),
                usd: Some(1.0),
                period: BudgetPeriod::Day,
            }),
        );
        let reg = StateRegistry::default();
        let now = 1_000_000;
        let err = admit(&k, &reg, est(u64::MAX), now).unwrap_err();
        assert_eq!(err.kind, LimitKind::Tokens);
        // One admitted request, then a reservation that would wrap `used + est` to a tiny sum.
        let t = admit(&k, &reg, est(10), now).unwrap();
        assert_eq!(
            admit(&k, &reg, est(u64::MAX - 5), now).unwrap_err().kind,
            LimitKind::Tokens
        );
        // A non-finite or absurd cost is refused by the USD budget.
        let inf = Estimate {
            tokens: 1,
            usd: f64::INFINITY,
        };
        assert_eq!(
            admit(&k, &reg, inf, now).unwrap_err().kind,
            LimitKind::Budget
        );
        drop(t);
    }

    #[test]
    fn huge_usage_reported_by_an_upstream_saturates() {
        let k = key(
            Limits {
                tokens_per_minute: Some(1000),
                ..Default::default()
            },
            Some(BudgetRule {
                tokens: Some(u64::MAX),
                usd: None,
                period: BudgetPeriod::Day,
            }),
        );
        let reg = StateRegistry::default();
        let t0 = 1_000_000;
        admit(&k, &reg, est(10), t0)
            .unwrap()
            .settle_at(u64::MAX, f64::NAN, t0);
        let t = admit(&k, &reg, est(10), t0 + 1);
        assert_eq!(t.unwrap_err().kind, LimitKind::Tokens, "the window is full");
        // An upstream reporting u64::MAX twice must not wrap the budget back to zero.
        let state = k.state(&reg).clone();
        assert_eq!(state.counters.lock().unwrap().budget.tokens, u64::MAX);
        assert_eq!(state.take_unreported().unwrap().tokens, u64::MAX);
        state.restore_unreported(Unreported {
            tokens: u64::MAX,
            usd: 0.0,
            last_used: 1,
        });
        state.restore_unreported(Unreported {
            tokens: u64::MAX,
            usd: 0.0,
            last_used: 1,
        });
        assert_eq!(state.take_unreported().unwrap().tokens, u64::MAX);
    }

    #[test]
    fn a_saturated_second_leaving_the_window_keeps_the_others() {
        let mut w = Window::default();
        w.add(100, u64::MAX);
        w.add(101, u64::MAX);
        w.add(102, 300);
        assert_eq!(w.used(102), u64::MAX);
        // Once both huge seconds left, exactly the 300 of second 102 remain.
        assert_eq!(w.used(161), 300);
        w.settle(102, 300, u64::MAX, 161);
        assert_eq!(w.used(161), u64::MAX);
        assert_eq!(w.used(162), 0);
        assert_eq!(w.wait_for(162, u64::MAX), WINDOW);
    }

    #[test]
    fn a_refused_request_never_holds_a_concurrency_slot() {
        let k = key(
            Limits {
                max_concurrent: Some(2),
                requests_per_minute: Some(1),
                ..Default::default()
            },
            None,
        );
        let reg = StateRegistry::default();
        let t = admit(&k, &reg, est(1), 10).unwrap();
        assert_eq!(k.state(&reg).in_flight.load(Ordering::Acquire), 1);
        // Refused by the request rate after taking a slot: the slot comes back.
        assert_eq!(
            admit(&k, &reg, est(1), 10).unwrap_err().kind,
            LimitKind::Requests
        );
        assert_eq!(k.state(&reg).in_flight.load(Ordering::Acquire), 1);
        t.settle(1, 0.0);
        assert_eq!(k.state(&reg).in_flight.load(Ordering::Acquire), 0);
    }

    /// Property tests: random requests against random limits, admitted, settled and cancelled
    /// in random order, checked against a plain model of what the limits mean.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Admit { tokens: u64, usd: u32 },
            Settle { which: usize, tokens: u64, usd: u32 },
            Cancel { which: usize },
            Advance { secs: u64 },
        }

        #[derive(Debug, Clone)]
        struct Drawn {
            rpm: Option<u64>,
            tpm: Option<u64>,
            concurrent: Option<u32>,
            budget_tokens: Option<u64>,
            /// In 1/8 dollars, so every sum below is exact in f64.
            budget_eighths: Option<u32>,
        }

        /// Dollars as multiples of 1/64: exact in f64, so the model and the code agree
        /// to the bit on every comparison.
        fn dollars(sixty_fourths: u32) -> f64 {
            f64::from(sixty_fourths) / 64.0
        }

        fn tokens() -> impl Strategy<Value = u64> {
            prop_oneof![
                8 => 0u64..400,
                1 => Just(u64::MAX),
                1 => (u64::MAX - 1000)..=u64::MAX,
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (tokens(), 0u32..64).prop_map(|(tokens, usd)| Op::Admit { tokens, usd }),
                2 => (any::<usize>(), prop_oneof![4 => 0u64..500, 1 => tokens()], 0u32..64)
                    .prop_map(|(which, tokens, usd)| Op::Settle { which, tokens, usd }),
                1 => any::<usize>().prop_map(|which| Op::Cancel { which }),
                2 => prop_oneof![3 => 0u64..5, 1 => 0u64..90].prop_map(|secs| Op::Advance { secs }),
            ]
        }

        fn limits() -> impl Strategy<Value = Drawn> {
            (
                proptest::option::of(1u64..20),
                proptest::option::of(1u64..2000),
                proptest::option::of(1u32..6),
                proptest::option::of(1u64..5000),
                proptest::option::of(1u32..80),
            )
                .prop_map(|(rpm, tpm, concurrent, budget_tokens, budget_eighths)| {
                    Drawn {
                        rpm,
                        tpm,
                        concurrent,
                        budget_tokens,
                        budget_eighths,
                    }
                })
        }

        /// What the limits mean, kept the simple way: every admission and every charge.
        #[derive(Default)]
        struct Model {
            /// Seconds of admitted requests.
            requests: Vec<u64>,
            /// (second, tokens) charged to the minute window.
            charges: Vec<(u64, u64)>,
            budget_used_tokens: u128,
            budget_used_usd: f64,
        }

        struct Open {
            ticket: Ticket,
            second: u64,
            tokens: u64,
            usd: f64,
            /// Index of its charge in `Model::charges`, when a token limit is set.
            charge: Option<usize>,
        }

        impl Model {
            fn in_window(now: u64, sec: u64) -> bool {
                sec <= now && now - sec < WINDOW
            }

            fn requests_in_window(&self, now: u64) -> u64 {
                self.requests
                    .iter()
                    .filter(|s| Self::in_window(now, **s))
                    .count() as u64
            }

            fn tokens_in_window(&self, now: u64) -> u128 {
                self.charges
                    .iter()
                    .filter(|(s, _)| Self::in_window(now, *s))
                    .map(|(_, t)| u128::from(*t))
                    .sum()
            }
        }

        fn run(limits: Drawn, ops: Vec<Op>) -> Result<(), TestCaseError> {
            let k = key(
                Limits {
                    requests_per_minute: limits.rpm,
                    tokens_per_minute: limits.tpm,
                    max_concurrent: limits.concurrent,
                },
                (limits.budget_tokens.is_some() || limits.budget_eighths.is_some()).then(|| {
                    BudgetRule {
                        tokens: limits.budget_tokens,
                        usd: limits.budget_eighths.map(|e| f64::from(e) / 8.0),
                        period: BudgetPeriod::Month,
                    }
                }),
            );
            let reg = StateRegistry::default();
            let state = k.state(&reg).clone();
            // The start of next month: ahead of the wall clock (which dropped tickets settle
            // at), and hours from the next month boundary, so one budget period holds.
            let wall = unix_now();
            let mut now = wall + budget_period(BudgetPeriod::Month, wall).1 + 3600;
            let mut model = Model::default();
            let mut open: Vec<Open> = Vec::new();
            // While no request used more than it reserved, the limits hold at every moment,
            // not only at admissions.
            let mut overused = false;

            for op in ops {
                match op {
                    Op::Advance { secs } => now += secs,
                    Op::Admit { tokens, usd } => {
                        let usd = dollars(usd);
                        let reserved_tokens: u128 = open.iter().map(|o| u128::from(o.tokens)).sum();
                        let reserved_usd: f64 = open.iter().map(|o| o.usd).sum();
                        let fits_concurrency =
                            limits.concurrent.is_none_or(|m| (open.len() as u32) < m);
                        let fits_rpm = limits.rpm.is_none_or(|m| model.requests_in_window(now) < m);
                        let fits_tpm = limits.tpm.is_none_or(|m| {
                            model.tokens_in_window(now) + u128::from(tokens) <= u128::from(m)
                        });
                        let fits_budget_tokens = limits.budget_tokens.is_none_or(|m| {
                            model.budget_used_tokens + reserved_tokens + u128::from(tokens)
                                <= u128::from(m)
                        });
                        let fits_budget_usd = limits.budget_eighths.is_none_or(|e| {
                            model.budget_used_usd + reserved_usd + usd <= f64::from(e) / 8.0
                        });
                        let fits = fits_concurrency
                            && fits_rpm
                            && fits_tpm
                            && fits_budget_tokens
                            && fits_budget_usd;
                        let got = admit(&k, &reg, Estimate { tokens, usd }, now);
                        prop_assert_eq!(
                            got.is_ok(),
                            fits,
                            "admit {} tokens ${} at {}: {:?}",
                            tokens,
                            usd,
                            now,
                            got.as_ref().err()
                        );
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
                        let o = open.swap_remove(which % open.len());
                        let usd = dollars(usd);
                        overused |= tokens > o.tokens || usd > o.usd;
                        if let Some(i) = o.charge {
                            if Model::in_window(now, o.second) {
                                model.charges[i].1 = tokens;
                            } else if tokens > o.tokens {
                                model.charges.push((now, tokens - o.tokens));
                            }
                        }
                        model.budget_used_tokens += u128::from(tokens);
                        model.budget_used_usd += usd;
                        o.ticket.settle_at(tokens, usd, now);
                    }
                    Op::Cancel { which } if !open.is_empty() => {
                        let o = open.swap_remove(which % open.len());
                        if let Some(i) = o.charge
                            && Model::in_window(now, o.second)
                        {
                            model.charges[i].1 = 0;
                        }
                        // The real path: the ticket is dropped unsettled.
                        drop(o.ticket);
                    }
                    Op::Settle { .. } | Op::Cancel { .. } => {}
                }

                // No limit is exceeded.
                if let Some(m) = limits.concurrent {
                    prop_assert!(open.len() as u32 <= m);
                    prop_assert_eq!(state.in_flight.load(Ordering::Acquire), open.len() as u32);
                }
                if let Some(m) = limits.rpm {
                    prop_assert!(model.requests_in_window(now) <= m);
                }
                if !overused {
                    let reserved: u128 = open.iter().map(|o| u128::from(o.tokens)).sum();
                    if let Some(m) = limits.tpm {
                        prop_assert!(model.tokens_in_window(now) <= u128::from(m));
                    }
                    if let Some(m) = limits.budget_tokens {
                        prop_assert!(model.budget_used_tokens + reserved <= u128::from(m));
                    }
                    if let Some(e) = limits.budget_eighths {
                        let reserved_usd: f64 = open.iter().map(|o| o.usd).sum();
                        prop_assert!(model.budget_used_usd + reserved_usd <= f64::from(e) / 8.0);
                    }
                }
            }

            // Every reservation is returned.
            drop(open);
            prop_assert_eq!(state.in_flight.load(Ordering::Acquire), 0);
            {
                let c = state.counters.lock().unwrap();
                prop_assert_eq!(c.budget.reserved_tokens, 0);
                prop_assert_eq!(c.budget.reserved_usd, 0.0);
            }
            let later = now + WINDOW;
            if let Some(m) = limits.tpm {
                let mut c = state.counters.lock().unwrap();
                prop_assert_eq!(c.tokens.as_mut().map_or(0, |w| w.used(later)), 0);
                drop(c);
                // The whole minute's allowance is there again (budget permitting).
                if limits.budget_tokens.is_none() && limits.budget_eighths.is_none() {
                    prop_assert!(admit(&k, &reg, est(m), later).is_ok());
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn limits_hold_and_reservations_come_back(
                limits in limits(),
                ops in proptest::collection::vec(op(), 1..200),
            ) {
                run(limits, ops)?;
            }
        }
    }
}
