//! Usage periods: half-open UTC intervals `[start, end)` computed from an
//! anchor. The k-th boundary is always `anchor + k intervals`, never "the
//! previous boundary + 1 interval", so a month-end anchor survives short
//! months: Jan 31 → Feb 28 (29 in a leap year) → Mar 31.

use chrono::{DateTime, Datelike, Duration, Utc};
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

/// An anchor split into calendar fields once, so each boundary is integer
/// arithmetic (this runs on every `check`).
#[derive(Clone, Copy)]
struct CivilAnchor {
    /// Months since year 0 (`year * 12 + month - 1`).
    month_index: i64,
    day: u32,
    /// Seconds into the day, and the sub-second part.
    seconds_of_day: i64,
    nanos: u32,
}

impl CivilAnchor {
    fn new(anchor: DateTime<Utc>) -> Self {
        let date = anchor.date_naive();
        let seconds = anchor.timestamp();
        Self {
            month_index: i64::from(date.year()) * 12 + i64::from(date.month()) - 1,
            day: date.day(),
            seconds_of_day: seconds.rem_euclid(86_400),
            nanos: anchor.timestamp_subsec_nanos(),
        }
    }

    /// The boundary `months` months from the anchor, the day clamped to the
    /// target month's length.
    fn boundary(&self, months: i64) -> DateTime<Utc> {
        let index = self.month_index + months;
        let year = index.div_euclid(12);
        let month = (index.rem_euclid(12) + 1) as u32;
        let day = self.day.min(days_in_month(year as i32, month));
        let seconds = days_from_civil(year, month, day) * 86_400 + self.seconds_of_day;
        DateTime::from_timestamp(seconds, self.nanos)
            .expect("within chrono's range for realistic anchors")
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

pub fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
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
            let civil = CivilAnchor::new(anchor);
            let at_date = at.date_naive();
            let months_apart =
                i64::from(at_date.year()) * 12 + i64::from(at_date.month()) - 1 - civil.month_index;
            // An estimate within one step of the answer; walk to it.
            let mut k = months_apart.div_euclid(step);
            let mut start = civil.boundary(k * step);
            while start > at {
                k -= 1;
                start = civil.boundary(k * step);
            }
            let mut end = civil.boundary((k + 1) * step);
            while end <= at {
                k += 1;
                start = end;
                end = civil.boundary((k + 1) * step);
            }
            Period {
                start,
                end: Some(end),
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
    fn civil_day_numbers_match_chrono() {
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        let mut date = chrono::NaiveDate::from_ymd_opt(1895, 1, 1).unwrap();
        while date < chrono::NaiveDate::from_ymd_opt(2105, 1, 1).unwrap() {
            let expected = (date - epoch).num_days();
            assert_eq!(
                days_from_civil(i64::from(date.year()), date.month(), date.day()),
                expected,
                "{date}"
            );
            date = date.succ_opt().unwrap();
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
