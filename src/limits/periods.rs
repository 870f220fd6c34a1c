//! UTC days and months for the spend budgets (SC-6): which counter a moment belongs to and how
//! long until the next one starts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A moment as seconds since the Unix epoch (UTC).
pub type UnixSecs = u64;

pub fn now_utc() -> UnixSecs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

const DAY: u64 = 86_400;

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Month => "monthly",
        }
    }

    /// The limit's name in metrics and messages.
    pub fn limit_name(self) -> &'static str {
        match self {
            Period::Day => "daily_budget_usd",
            Period::Month => "monthly_budget_usd",
        }
    }

    /// How long a counter is kept: past its period, so a late charge still lands.
    pub fn keep(self) -> Duration {
        Duration::from_secs(match self {
            Period::Day => 2 * DAY,
            Period::Month => 32 * DAY,
        })
    }

    /// The start of the period holding `at`.
    pub fn start(self, at: UnixSecs) -> UnixSecs {
        let day = at / DAY;
        match self {
            Period::Day => day * DAY,
            Period::Month => {
                let (y, m, _) = civil(day);
                days_from_civil(y, m, 1) * DAY
            }
        }
    }

    /// Until the next period starts (a budget's `Retry-After`).
    pub fn until_next(self, at: UnixSecs) -> Duration {
        let next = match self {
            Period::Day => (at / DAY + 1) * DAY,
            Period::Month => {
                let (y, m, _) = civil(at / DAY);
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m, 1) * DAY
            }
        };
        Duration::from_secs(next.saturating_sub(at))
    }

    /// `2026-11-22` or `2026-11`.
    pub fn label(self, at: UnixSecs) -> String {
        let (y, m, d) = civil(at / DAY);
        match self {
            Period::Day => format!("{y:04}-{m:02}-{d:02}"),
            Period::Month => format!("{y:04}-{m:02}"),
        }
    }
}

/// The counter of `key`'s spend in the period holding `at`, micro-USD.
pub fn spend_name(key: &str, p: Period, at: UnixSecs) -> String {
    format!("spend:{key}:{}", p.label(at))
}

/// Year, month (1–12) and day (1–31) of a day number counted from 1970-01-01.
fn civil(days: u64) -> (u64, u64, u64) {
    // Counted in 400-year eras from 0000-03-01, so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The day number (from 1970-01-01) of a date; the inverse of [`civil`].
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y % 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-02-29 23:59:30 UTC, in a leap year.
    const LEAP_END: u64 = 1_709_251_170;

    #[test]
    fn sc6_days_and_months_in_utc() {
        assert_eq!(Period::Day.label(0), "1970-01-01");
        assert_eq!(Period::Day.label(LEAP_END), "2024-02-29");
        assert_eq!(Period::Month.label(LEAP_END), "2024-02");
        assert_eq!(Period::Day.until_next(LEAP_END), Duration::from_secs(30));
        assert_eq!(Period::Month.until_next(LEAP_END), Duration::from_secs(30));
        assert_eq!(Period::Day.label(LEAP_END + 30), "2024-03-01");
        // 2025-12-31 12:00 UTC: the next month is in the next year.
        let dec = 1_767_182_400;
        assert_eq!(Period::Month.label(dec), "2025-12");
        assert_eq!(
            Period::Month.until_next(dec),
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(Period::Month.start(dec), 1_764_547_200, "2025-12-01");
        assert_eq!(Period::Day.start(dec), dec - 12 * 3600);
        for day in [0, 59, 365, 10_957, 19_782, 20_413] {
            let (y, m, d) = civil(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }
}
