//! The time the queue machinery judges leases, due times, backoff and heartbeats by.
//!
//! Passed in rather than read from the system in each place, so that tests can move time
//! on without sleeping: a manual clock advanced by hand, or one that follows tokio's
//! (pausable) timer clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A source of the current time in Unix epoch milliseconds, the unit of every time column.
/// Cheap to clone; clones share the same time.
#[derive(Debug, Clone)]
pub struct Clock(Source);

#[derive(Debug, Clone)]
enum Source {
    /// The system's wall clock: what the database's other writers see too.
    System,
    /// The system's wall clock off by a fixed number of milliseconds.
    Skewed(i64),
    /// A time set and advanced by hand.
    Manual(Arc<AtomicI64>),
    /// A wall-clock time taken once, then moved on by tokio's timer clock, which tests can
    /// pause and advance.
    Tokio {
        start_ms: i64,
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// The system's wall clock, for the daemon and the command line.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// The system's wall clock off by `offset_ms` (ahead when positive): a host whose clock
    /// is wrong, for showing that the database's clock decides where hosts disagree.
    pub fn skewed(offset_ms: i64) -> Clock {
        Clock(Source::Skewed(offset_ms))
    }

    /// A clock standing at `at_ms` until [`Clock::advance`] or [`Clock::set`] moves it.
    pub fn manual(at_ms: i64) -> Clock {
        Clock(Source::Manual(Arc::new(AtomicI64::new(at_ms))))
    }

    /// A clock that starts at the system's time now and then advances with tokio's timer
    /// clock (so `tokio::time::pause` and `advance` move it).
    pub fn following_tokio() -> Clock {
        Clock(Source::Tokio {
            start_ms: system_now_ms(),
            start: tokio::time::Instant::now(),
        })
    }

    /// The current time, ms since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Source::System => system_now_ms(),
            Source::Skewed(offset) => system_now_ms().saturating_add(*offset),
            Source::Manual(at) => at.load(Ordering::Relaxed),
            Source::Tokio { start_ms, start } => {
                start_ms + start.elapsed().as_millis().min(i64::MAX as u128) as i64
            }
        }
    }

    /// The current time as a UTC date and time (for what is decided by the calendar: the
    /// daily quota's reset, the date in a generated serial).
    pub fn now_utc(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_default()
    }

    /// `now_ms() + d`, for deadlines (a lease, a pause) stored in the database.
    pub fn after(&self, d: Duration) -> i64 {
        self.now_ms()
            .saturating_add(d.as_millis().min(i64::MAX as u128) as i64)
    }

    /// Moves a manual clock forward by `d`; other clocks move by themselves, so this does
    /// nothing to them.
    pub fn advance(&self, d: Duration) {
        if let Source::Manual(at) = &self.0 {
            at.fetch_add(d.as_millis() as i64, Ordering::Relaxed);
        }
    }

    /// Sets a manual clock to `at_ms` (nothing for other clocks).
    pub fn set(&self, at_ms: i64) {
        if let Source::Manual(at) = &self.0 {
            at.store(at_ms, Ordering::Relaxed);
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

/// The system's wall-clock time in Unix epoch milliseconds.
pub fn system_now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_keeps_its_offset_from_the_system() {
        let before = system_now_ms();
        let behind = Clock::skewed(-3_600_000).now_ms();
        let after = system_now_ms();
        assert!((before - 3_600_000..=after - 3_600_000).contains(&behind));
    }

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = Clock::manual(1_000);
        let shared = clock.clone();
        assert_eq!(clock.now_ms(), 1_000);
        shared.advance(Duration::from_millis(250));
        assert_eq!(clock.now_ms(), 1_250);
        assert_eq!(clock.after(Duration::from_secs(1)), 2_250);
        clock.set(7);
        assert_eq!(shared.now_ms(), 7);
        clock.set(1_764_547_200_000);
        assert_eq!(clock.now_utc().to_rfc3339(), "2025-12-01T00:00:00+00:00");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_follows_paused_time() {
        let clock = Clock::following_tokio();
        let start = clock.now_ms();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_ms() - start, 3_600_000);
    }

    #[test]
    fn the_system_clock_is_the_wall_clock() {
        let before = system_now_ms();
        let now = Clock::system().now_ms();
        assert!(now >= before && now - before < 5_000, "{before} {now}");
    }
}
