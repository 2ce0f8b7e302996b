//! Usage periods: half-open UTC intervals `[start, end)` computed from an
//! anchor. The k-th boundary is always `anchor + k intervals`, never "the
//! previous boundary + 1 interval", so a month-end anchor survives short
//! months: Jan 31 → Feb 28 (29 in a leap year) → Mar 31.

use chrono::{DateTime, Datelike, Duration, Months, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// How often a metered feature's usage starts again from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ResetInterval {
    Day,
    Week,
    #[default]
    Month,
    Year,
    /// A running total that never resets (seats, projects).
    Never,
}

/// The usage period an instant falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// Inclusive. For [`ResetInterval::Never`], [`NEVER_PERIOD_START`].
    pub start: DateTime<Utc>,
    /// Exclusive; `None` for a total that never resets.
    pub end: Option<DateTime<Utc>>,
}

/// The key under which a never-resetting total is stored: a fixed instant,
/// so moving the anchor (a new subscription) does not reset it.
pub const NEVER_PERIOD_START: DateTime<Utc> = DateTime::UNIX_EPOCH;

impl Period {
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        at >= self.start && self.end.is_none_or(|end| at < end)
    }

    /// Whether this is a real period (not a never-resetting total).
    pub fn resets(&self) -> bool {
        self.end.is_some()
    }
}

/// The `k`-th boundary after (k ≥ 0) or before (k < 0) the anchor, clamping
/// the day of month to the target month's length.
fn month_boundary(anchor: DateTime<Utc>, months: i64) -> DateTime<Utc> {
    let naive = anchor.naive_utc();
    let date = naive.date();
    let first_of_month = NaiveDate::from_ymd_opt(date.year(), date.month(), 1)
        .expect("the first of a valid month exists");
    let shifted = if months >= 0 {
        first_of_month.checked_add_months(Months::new(months as u32))
    } else {
        first_of_month.checked_sub_months(Months::new(months.unsigned_abs() as u32))
    }
    .expect("month arithmetic stays within chrono's range for realistic anchors");
    let day = date
        .day()
        .min(days_in_month(shifted.year(), shifted.month()));
    let target = NaiveDate::from_ymd_opt(shifted.year(), shifted.month(), day)
        .expect("day clamped to the month's length")
        .and_time(naive.time());
    Utc.from_utc_datetime(&target)
}

pub fn days_in_month(year: i32, month: u32) -> u32 {
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(next_year, next_month, 1)
        .and_then(|first| first.pred_opt())
        .map_or(28, |last| last.day())
}

/// The period of `interval`, anchored at `anchor`, that contains `at`.
/// Instants before the anchor fall in periods counted backwards from it.
pub fn period_containing(
    anchor: DateTime<Utc>,
    interval: ResetInterval,
    at: DateTime<Utc>,
) -> Period {
    match interval {
        ResetInterval::Never => Period {
            start: NEVER_PERIOD_START,
            end: None,
        },
        ResetInterval::Day | ResetInterval::Week => {
            let length = if interval == ResetInterval::Day {
                Duration::days(1)
            } else {
                Duration::weeks(1)
            };
            let elapsed = (at - anchor).num_microseconds().unwrap_or(i64::MAX);
            let step = length.num_microseconds().expect("a week fits in i64 µs");
            let k = elapsed.div_euclid(step);
            let start = anchor + Duration::microseconds(k * step);
            Period {
                start,
                end: Some(start + length),
            }
        }
        ResetInterval::Month | ResetInterval::Year => {
            let step: i64 = if interval == ResetInterval::Month {
                1
            } else {
                12
            };
            let months_apart = (i64::from(at.year()) - i64::from(anchor.year())) * 12
                + i64::from(at.month())
                - i64::from(anchor.month());
            // An estimate within one step of the answer; walk to it.
            let mut k = months_apart.div_euclid(step);
            while month_boundary(anchor, k * step) > at {
                k -= 1;
            }
            while month_boundary(anchor, (k + 1) * step) <= at {
                k += 1;
            }
            Period {
                start: month_boundary(anchor, k * step),
                end: Some(month_boundary(anchor, (k + 1) * step)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn month(anchor: &str, when: &str) -> (DateTime<Utc>, DateTime<Utc>) {
        let p = period_containing(at(anchor), ResetInterval::Month, at(when));
        (p.start, p.end.unwrap())
    }

    #[test]
    fn month_end_anchor_clamps_and_returns_to_the_31st() {
        let anchor = "2027-01-31T10:00:00Z";
        assert_eq!(
            month(anchor, "2027-02-15T00:00:00Z"),
            (at("2027-01-31T10:00:00Z"), at("2027-02-28T10:00:00Z"))
        );
        assert_eq!(
            month(anchor, "2027-03-01T00:00:00Z"),
            (at("2027-02-28T10:00:00Z"), at("2027-03-31T10:00:00Z"))
        );
        // Never from the previous boundary: back to the 31st, not the 28th.
        assert_eq!(
            month(anchor, "2027-04-01T00:00:00Z"),
            (at("2027-03-31T10:00:00Z"), at("2027-04-30T10:00:00Z"))
        );
    }

    #[test]
    fn leap_years_give_february_29() {
        assert_eq!(
            month("2028-01-31T00:00:00Z", "2028-02-29T12:00:00Z"),
            (at("2028-02-29T00:00:00Z"), at("2028-03-31T00:00:00Z"))
        );
        assert_eq!(
            month("2028-01-30T00:00:00Z", "2028-02-28T12:00:00Z"),
            (at("2028-01-30T00:00:00Z"), at("2028-02-29T00:00:00Z"))
        );
        let yearly = period_containing(
            at("2028-02-29T08:00:00Z"),
            ResetInterval::Year,
            at("2029-06-01T00:00:00Z"),
        );
        assert_eq!(yearly.start, at("2029-02-28T08:00:00Z"));
        assert_eq!(yearly.end, Some(at("2030-02-28T08:00:00Z")));
        let leap_again = period_containing(
            at("2028-02-29T08:00:00Z"),
            ResetInterval::Year,
            at("2032-03-01T00:00:00Z"),
        );
        assert_eq!(leap_again.start, at("2032-02-29T08:00:00Z"));
    }

    #[test]
    fn periods_are_half_open() {
        let anchor = at("2027-01-15T00:00:00Z");
        let boundary = at("2027-02-15T00:00:00Z");
        let before = period_containing(
            anchor,
            ResetInterval::Month,
            boundary - Duration::microseconds(1),
        );
        let on = period_containing(anchor, ResetInterval::Month, boundary);
        assert_eq!(before.end, Some(boundary));
        assert_eq!(on.start, boundary);
        assert!(on.contains(boundary) && !before.contains(boundary));
    }

    #[test]
    fn instants_before_the_anchor_count_backwards() {
        let p = period_containing(
            at("2027-03-31T00:00:00Z"),
            ResetInterval::Month,
            at("2027-03-01T00:00:00Z"),
        );
        assert_eq!(p.start, at("2027-02-28T00:00:00Z"));
        assert_eq!(p.end, Some(at("2027-03-31T00:00:00Z")));
        let d = period_containing(
            at("2027-03-10T12:00:00Z"),
            ResetInterval::Day,
            at("2027-03-09T13:00:00Z"),
        );
        assert_eq!(d.start, at("2027-03-09T12:00:00Z"));
    }

    #[test]
    fn days_and_weeks_keep_the_anchor_time_of_day() {
        let anchor = at("2027-01-01T09:30:00Z");
        let d = period_containing(anchor, ResetInterval::Day, at("2027-01-05T09:29:59Z"));
        assert_eq!(d.start, at("2027-01-04T09:30:00Z"));
        assert_eq!(d.end, Some(at("2027-01-05T09:30:00Z")));
        let w = period_containing(anchor, ResetInterval::Week, at("2027-01-15T00:00:00Z"));
        assert_eq!(w.start, at("2027-01-08T09:30:00Z"));
        assert_eq!(w.end, Some(at("2027-01-15T09:30:00Z")));
    }

    #[test]
    fn never_is_one_fixed_period() {
        let p = period_containing(
            at("2027-01-01T00:00:00Z"),
            ResetInterval::Never,
            at("2090-01-01T00:00:00Z"),
        );
        assert_eq!(p.start, NEVER_PERIOD_START);
        assert!(!p.resets() && p.contains(at("2090-01-01T00:00:00Z")));
    }

    #[test]
    fn every_instant_of_a_long_range_lies_in_exactly_its_period() {
        // Walk 4 years in 7-hour steps across a month-end anchor: each instant
        // is inside its period, and consecutive periods tile without gaps.
        let anchor = at("2027-08-31T23:00:00Z");
        let mut t = at("2026-12-01T00:00:00Z");
        let mut last: Option<Period> = None;
        while t < at("2031-01-01T00:00:00Z") {
            let p = period_containing(anchor, ResetInterval::Month, t);
            assert!(p.contains(t), "{t} not in {p:?}");
            if let Some(prev) = last {
                assert!(
                    prev == p || prev.end == Some(p.start),
                    "{prev:?} then {p:?}"
                );
            }
            last = Some(p);
            t += Duration::hours(7);
        }
    }

    #[test]
    fn days_in_month_knows_leap_years() {
        assert_eq!(days_in_month(2028, 2), 29);
        assert_eq!(days_in_month(2100, 2), 28);
        assert_eq!(days_in_month(2000, 2), 29);
        assert_eq!(days_in_month(2027, 12), 31);
    }
}
