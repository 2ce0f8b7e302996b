//! The current time, injectable so that expiry, periods and windows are tested
//! by setting and advancing a clock instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Timelike, Utc};

/// Where domain code gets "now" from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// The wall clock, to the microsecond: both stores keep microseconds, so
/// a record a write answers with reads back the same later.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        let now = Utc::now();
        now.with_nanosecond(now.nanosecond() / 1_000 * 1_000)
            .unwrap_or(now)
    }
}

/// A clock that only moves when told to. Cloning shares the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    micros: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            micros: Arc::new(AtomicI64::new(start.timestamp_micros())),
        }
    }

    pub fn set(&self, to: DateTime<Utc>) {
        self.micros.store(to.timestamp_micros(), Ordering::SeqCst);
    }

    /// Moves the clock forward (or back, with a negative duration).
    pub fn advance(&self, by: Duration) {
        let delta = by
            .num_microseconds()
            .expect("advance fits in i64 microseconds");
        self.micros.fetch_add(delta, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        Utc.timestamp_micros(self.micros.load(Ordering::SeqCst))
            .single()
            .expect("manual clock holds a representable instant")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_sets_and_advances_and_clones_share_time() {
        let start = Utc.with_ymd_and_hms(2024, 1, 31, 23, 59, 59).unwrap();
        let clock = ManualClock::new(start);
        let other = clock.clone();
        assert_eq!(clock.now(), start);
        clock.advance(Duration::seconds(1));
        assert_eq!(
            other.now(),
            Utc.with_ymd_and_hms(2024, 2, 1, 0, 0, 0).unwrap()
        );
        other.set(start);
        assert_eq!(clock.now(), start);
        clock.advance(Duration::milliseconds(-1500));
        assert_eq!(
            clock.now(),
            Utc.with_ymd_and_hms(2024, 1, 31, 23, 59, 57).unwrap() + Duration::milliseconds(500)
        );
    }

    #[test]
    fn system_clock_is_close_to_now() {
        let delta = SystemClock.now() - Utc::now();
        assert!(delta.num_seconds().abs() < 5);
    }

    #[test]
    fn system_clock_keeps_whole_microseconds() {
        // Without the truncation this holds for one reading in a thousand.
        for _ in 0..100 {
            let now = SystemClock.now();
            assert_eq!(now.nanosecond() % 1_000, 0, "{now:?}");
            assert_eq!(
                DateTime::from_timestamp_micros(now.timestamp_micros()),
                Some(now)
            );
        }
    }
}
