//! Usage across proxies: proxies report per-key deltas every few seconds; the leader sums
//! them for the current budget period and writes them to `ApiKey.status.usage`. Every
//! replica reads that status back through its watch and marks keys whose budget is used up
//! as `exhausted` in the snapshot, so a budget holds across all proxies.

use std::collections::HashMap;

use modelgate_crds::{ApiKey, BudgetPeriod};
use modelgate_dataplane::admission::{civil, unix_now};
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
    let (Some(budget), Some(u)) = (key.spec.budget.as_ref(), from_status(key, now)) else {
        return false;
    };
    budget.tokens.is_some_and(|t| u.tokens as i64 >= t) || budget.usd.is_some_and(|d| u.usd >= d)
}

/// The leader's running sums.
#[derive(Debug, Default)]
pub struct Book {
    keys: HashMap<String, KeyUsage>,
}

impl Book {
    /// Add a report; `key_of` finds the ApiKey for an id (unknown ids are dropped).
    pub fn add<'a>(
        &mut self,
        report: &Report,
        key_of: impl Fn(&str) -> Option<&'a ApiKey>,
    ) -> usize {
        let now = unix_now();
        let mut applied = 0;
        for (id, d) in &report.keys {
            let Some(key) = key_of(id) else { continue };
            let period = period_label(key, now);
            let entry = self.keys.entry(id.clone()).or_insert_with(|| {
                from_status(key, now).unwrap_or(KeyUsage {
                    period: period.clone(),
                    ..KeyUsage::default()
                })
            });
            if entry.period != period {
                *entry = KeyUsage {
                    period,
                    ..KeyUsage::default()
                };
            }
            entry.tokens += d.tokens;
            entry.usd += d.cost_usd;
            entry.last_used = entry.last_used.max(d.last_used);
            applied += 1;
        }
        applied
    }

    pub fn get(&self, id: &str) -> Option<&KeyUsage> {
        self.keys.get(id)
    }

    pub fn forget_others(&mut self, live: impl Fn(&str) -> bool) {
        self.keys.retain(|id, _| live(id));
    }
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
        assert_eq!(
            book.get("ns/k").unwrap().tokens,
            400,
            "300 from status + 2 × 50"
        );
        let old = key(1000, 999, Some("1999-01-01".into()));
        let mut book = Book::default();
        book.add(&report, |_| Some(&old));
        assert_eq!(
            book.get("ns/k").unwrap().tokens,
            50,
            "a past period does not count"
        );
        assert_eq!(book.add(&report, |_| None), 0);
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
