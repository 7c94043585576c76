//! Usage across proxies: proxies report per-key deltas every few seconds; the leader sums
//! them for the current budget period and writes them to `ApiKey.status.usage`. Every
//! replica reads that status back through its watch and marks keys whose budget is used up
//! as `exhausted` in the snapshot, so a budget holds across all proxies.
//!
//! Spent budget belongs to the key's name, not to the object: the leader keeps its sums
//! for the whole period, also after the ApiKey is deleted, and persists them in a
//! ConfigMap of the operator's namespace (which tenants cannot write), so deleting and
//! recreating an ApiKey, or a new leader, never hands out a fresh budget.

use std::collections::HashMap;

use modelgate_crds::{ApiKey, BudgetPeriod};
use modelgate_wire::clock::{civil, unix_now};
use serde::{Deserialize, Serialize};

/// What a proxy sends: usage since its previous report, per key id (`namespace/name`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub proxy: String,
    pub keys: HashMap<String, KeyDelta>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyDelta {
    pub tokens: u64,
    pub cost_usd: f64,
    /// Unix seconds of the last request.
    pub last_used: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyUsage {
    pub period: String,
    pub tokens: u64,
    pub usd: f64,
    pub last_used: u64,
}

/// The period label of a key's budget (month when it has none) at `now`.
pub fn period_label(key: &ApiKey, now: u64) -> String {
    let days = (now / 86_400) as i64;
    let (y, m, d) = civil(days);
    match key.spec.budget.as_ref().map(|b| b.period) {
        Some(BudgetPeriod::Day) => format!("{y:04}-{m:02}-{d:02}"),
        Some(BudgetPeriod::Month) | None => format!("{y:04}-{m:02}"),
    }
}

/// Usage as stored in a key's status, if it is for the current period.
pub fn from_status(key: &ApiKey, now: u64) -> Option<KeyUsage> {
    let u = key.status.as_ref()?.usage.as_ref()?;
    (u.period == period_label(key, now)).then(|| KeyUsage {
        period: u.period.clone(),
        tokens: u.tokens.max(0) as u64,
        usd: u.cost_usd.parse().unwrap_or(0.0),
        last_used: 0,
    })
}

/// True when the usage in the key's status has reached its budget.
pub fn exhausted(key: &ApiKey, now: u64) -> bool {
    used_up(key, from_status(key, now))
}

/// Has `spent` (in the key's current period) reached the key's budget?
fn used_up(key: &ApiKey, spent: Option<KeyUsage>) -> bool {
    let (Some(budget), Some(u)) = (key.spec.budget.as_ref(), spent) else {
        return false;
    };
    budget.tokens.is_some_and(|t| u.tokens as i64 >= t) || budget.usd.is_some_and(|d| u.usd >= d)
}

/// Why a usage report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("key {0:?}: costUsd must be a finite number >= 0")]
    BadNumber(String),
    #[error("key {0:?} is not served by the reporting proxy")]
    ForeignKey(String),
}

impl ReportError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::BadNumber(_) => "bad_number",
            Self::ForeignKey(_) => "foreign_key",
        }
    }
}

impl Report {
    /// Every number sane, and every key one that `serves(namespace)` allows.
    pub fn validate(&self, serves: impl Fn(&str) -> bool) -> Result<(), ReportError> {
        for (id, d) in &self.keys {
            if !d.cost_usd.is_finite() || d.cost_usd < 0.0 || d.cost_usd > 1e9 {
                return Err(ReportError::BadNumber(id.clone()));
            }
            let ns = id.split_once('/').map(|(ns, _)| ns);
            if !ns.is_some_and(&serves) {
                return Err(ReportError::ForeignKey(id.clone()));
            }
        }
        Ok(())
    }
}

/// One period's sums.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sums {
    pub period: String,
    pub tokens: u64,
    pub usd: f64,
}

impl Sums {
    fn add(&mut self, label: &str, tokens: u64, usd: f64) {
        if self.period != label {
            *self = Sums {
                period: label.to_owned(),
                ..Sums::default()
            };
        }
        self.tokens = self.tokens.saturating_add(tokens);
        self.usd += usd;
    }

    fn merge(&mut self, other: &Sums) {
        if self.period == other.period {
            self.tokens = self.tokens.max(other.tokens);
            self.usd = self.usd.max(other.usd);
        } else if other.period > self.period {
            *self = other.clone();
        }
    }
}

/// A key's spending in the current day and month, both always counted, so switching a
/// budget's period never starts it from zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    pub day: Sums,
    pub month: Sums,
    #[serde(default, skip_serializing)]
    pub last_used: u64,
}

/// The day and month labels at `now`.
fn labels(now: u64) -> (String, String) {
    let (y, m, d) = civil((now / 86_400) as i64);
    (format!("{y:04}-{m:02}-{d:02}"), format!("{y:04}-{m:02}"))
}

/// The leader's running sums, by key id (`namespace/name`).
#[derive(Debug, Default)]
pub struct Book {
    keys: HashMap<String, Spent>,
    /// Changed since last persisted.
    pub dirty: bool,
}

impl Book {
    /// Add a report; `key_of` finds the ApiKey for an id (unknown ids are dropped).
    pub fn add<'a>(
        &mut self,
        report: &Report,
        key_of: impl Fn(&str) -> Option<&'a ApiKey>,
    ) -> usize {
        let now = unix_now();
        let (day, month) = labels(now);
        let mut applied = 0;
        for (id, d) in &report.keys {
            let Some(key) = key_of(id) else { continue };
            let entry = self.keys.entry(id.clone()).or_insert_with(|| {
                // First report this term: start from what the key's status says.
                let mut spent = Spent::default();
                if let Some(u) = from_status(key, now) {
                    let seed = Sums {
                        period: u.period.clone(),
                        tokens: u.tokens,
                        usd: u.usd,
                    };
                    if u.period == day {
                        spent.day = seed.clone();
                        spent.month = Sums {
                            period: month.clone(),
                            ..seed
                        };
                    } else {
                        spent.month = seed;
                    }
                }
                spent
            });
            let usd = if d.cost_usd.is_finite() && d.cost_usd > 0.0 {
                d.cost_usd
            } else {
                0.0
            };
            entry.day.add(&day, d.tokens, usd);
            entry.month.add(&month, d.tokens, usd);
            entry.last_used = entry.last_used.max(d.last_used);
            applied += 1;
        }
        if applied > 0 {
            self.dirty = true;
        }
        applied
    }

    /// What the key spent in its budget's current period (month when it has none).
    pub fn current(&self, key: &ApiKey, now: u64) -> Option<KeyUsage> {
        let spent = self.keys.get(&key_id(key))?;
        let label = period_label(key, now);
        let sums = [&spent.day, &spent.month]
            .into_iter()
            .find(|s| s.period == label)?;
        Some(KeyUsage {
            period: sums.period.clone(),
            tokens: sums.tokens,
            usd: sums.usd,
            last_used: spent.last_used,
        })
    }

    /// True when this book (the leader's) says the key used up its budget.
    pub fn exhausted(&self, key: &ApiKey, now: u64) -> bool {
        used_up(key, self.current(key, now))
    }

    /// The persisted form: ConfigMap data, one entry per key (`namespace_name`: `_` never
    /// occurs in Kubernetes names). Keys without spending this month are dropped.
    pub fn to_data(&mut self, now: u64) -> std::collections::BTreeMap<String, String> {
        let (_, month) = labels(now);
        self.keys.retain(|_, s| s.month.period == month);
        self.keys
            .iter()
            .filter_map(|(id, spent)| {
                let (ns, name) = id.split_once('/')?;
                Some((format!("{ns}_{name}"), serde_json::to_string(spent).ok()?))
            })
            .collect()
    }

    /// Take in persisted sums (a new leader); the larger of two sums of a period wins.
    pub fn load(&mut self, data: &std::collections::BTreeMap<String, String>) {
        for (k, v) in data {
            let (Some((ns, name)), Ok(stored)) =
                (k.split_once('_'), serde_json::from_str::<Spent>(v))
            else {
                continue;
            };
            let e = self.keys.entry(format!("{ns}/{name}")).or_default();
            e.day.merge(&stored.day);
            e.month.merge(&stored.month);
        }
    }
}

/// What the fleet spent on each budgeted key of `keys` in the budget's current period (the
/// book's sums, else the key's status): sent to a proxy before each snapshot, so a proxy
/// that (re)starts counts from the fleet's figure, not from zero.
pub fn fleet_usage<'a>(
    keys: impl Iterator<Item = &'a ApiKey>,
    book: &Book,
    now: u64,
) -> Vec<modelgate_wire::KeyUsage> {
    keys.filter_map(|k| {
        let budget = k.spec.budget.as_ref()?;
        let spent = book.current(k, now).or_else(|| from_status(k, now))?;
        let period = match budget.period {
            BudgetPeriod::Day => modelgate_wire::BudgetPeriod::Day,
            BudgetPeriod::Month => modelgate_wire::BudgetPeriod::Month,
        };
        (spent.tokens > 0 || spent.usd > 0.0).then(|| modelgate_wire::KeyUsage {
            key: key_id(k),
            period: modelgate_wire::clock::budget_period(period, now).0,
            tokens: spent.tokens,
            usd: spent.usd,
        })
    })
    .collect()
}

/// `namespace/name`: how usage reports and the book name a key.
pub fn key_id(key: &ApiKey) -> String {
    format!(
        "{}/{}",
        key.metadata.namespace.as_deref().unwrap_or_default(),
        key.metadata.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_crds::{ApiKeySpec, ApiKeyStatus, Budget, Usage};

    fn key(budget_tokens: i64, used: i64, period: Option<String>) -> ApiKey {
        let mut k = ApiKey::new(
            "k",
            ApiKeySpec {
                secret_ref: None,
                models: vec![],
                limits: None,
                budget: Some(Budget {
                    tokens: Some(budget_tokens),
                    usd: None,
                    period: BudgetPeriod::Day,
                }),
                expires_at: None,
                disabled: None,
                max_cost_per_request: None,
            },
        );
        k.status = Some(ApiKeyStatus {
            usage: period.map(|p| Usage {
                period: p,
                tokens: used,
                cost_usd: "0".into(),
            }),
            ..Default::default()
        });
        k
    }

    #[test]
    fn sums_reports_on_top_of_status_and_rolls_periods() {
        let now = unix_now();
        let k = key(1000, 300, Some(period_label(&key(0, 0, None), now)));
        let mut book = Book::default();
        let report = Report {
            proxy: "p".into(),
            keys: [(
                "ns/k".to_owned(),
                KeyDelta {
                    tokens: 50,
                    cost_usd: 0.5,
                    last_used: now,
                },
            )]
            .into(),
        };
        assert_eq!(book.add(&report, |_| Some(&k)), 1);
        assert_eq!(book.add(&report, |_| Some(&k)), 1);
        let mut named = k.clone();
        named.metadata.namespace = Some("ns".into());
        assert_eq!(
            book.current(&named, now).unwrap().tokens,
            400,
            "300 from status + 2 × 50"
        );
        let old = key(1000, 999, Some("1999-01-01".into()));
        let mut book = Book::default();
        book.add(&report, |_| Some(&old));
        let mut named = old.clone();
        named.metadata.namespace = Some("ns".into());
        assert_eq!(
            book.current(&named, now).unwrap().tokens,
            50,
            "a past period does not count"
        );
        // The tenant switches the budget from day to month: the spending stays.
        named.spec.budget.as_mut().unwrap().period = BudgetPeriod::Month;
        assert_eq!(book.current(&named, now).unwrap().tokens, 50);
        assert_eq!(book.add(&report, |_| None), 0);
    }

    #[test]
    fn reports_are_validated_and_sums_survive_a_new_book() {
        let now = unix_now();
        let delta = |cost: f64| KeyDelta {
            tokens: 5,
            cost_usd: cost,
            last_used: now,
        };
        let report = |id: &str, cost: f64| Report {
            proxy: "p".into(),
            keys: [(id.to_owned(), delta(cost))].into(),
        };
        let serves_a = |ns: &str| ns == "a";
        assert!(report("a/k", 0.5).validate(serves_a).is_ok());
        assert_eq!(
            report("a/k", -1.0).validate(serves_a),
            Err(ReportError::BadNumber("a/k".into()))
        );
        assert!(report("a/k", f64::NAN).validate(serves_a).is_err());
        assert_eq!(
            report("b/k", 0.5).validate(serves_a),
            Err(ReportError::ForeignKey("b/k".into()))
        );
        assert!(report("nonamespace", 0.5).validate(serves_a).is_err());
        // A JSON negative token count does not even parse.
        assert!(
            serde_json::from_str::<KeyDelta>(r#"{"tokens":-5,"costUsd":0,"lastUsed":0}"#).is_err()
        );

        let k = key(10, 0, None);
        let mut book = Book::default();
        book.add(&report("ns/k", 0.0), |_| Some(&k));
        book.add(&report("ns/k", 0.0), |_| Some(&k));
        let mut named = k.clone();
        named.metadata.namespace = Some("ns".into());
        assert!(book.exhausted(&named, now), "10 of 10 tokens");
        let data = book.to_data(now);
        let mut fresh = Book::default();
        fresh.load(&data);
        assert_eq!(fresh.current(&named, now).unwrap().tokens, 10);
        assert!(fresh.exhausted(&named, now), "a new leader still knows");
    }

    #[test]
    fn exhaustion_follows_the_status() {
        let now = unix_now();
        let p = period_label(&key(0, 0, None), now);
        assert!(exhausted(&key(100, 100, Some(p.clone())), now));
        assert!(!exhausted(&key(100, 99, Some(p)), now));
        assert!(!exhausted(&key(100, 500, Some("1999-01-01".into())), now));
    }
}
