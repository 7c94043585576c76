//! Budget periods, which the operator (summing the fleet's reports) and every proxy (counting
//! its own spending) must cut at the same instants: UTC days and UTC calendar months.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::spec::BudgetPeriod;

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

pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (period id, seconds until the period ends) for a budget period at `now`: the id is the
/// day number for days and `year * 12 + month` for months.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_end_at_utc_midnight_and_month_start() {
        // 2026-12-01T18:00:00Z
        let now = 1_796_148_000;
        let (day, left) = budget_period(BudgetPeriod::Day, now);
        assert_eq!(civil(day as i64), (2026, 12, 1));
        assert_eq!(left, 6 * 3600);
        let (month, left) = budget_period(BudgetPeriod::Month, now);
        assert_eq!(month, 2026 * 12 + 12);
        assert_eq!(left, 30 * 86_400 + 6 * 3600);
    }
}
