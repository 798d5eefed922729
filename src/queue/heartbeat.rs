//! Liveness of the worker loops, for the systemd watchdog and `/healthz`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;

/// The time (ms) a loop last went round, and until when it waits idle. Cloning shares the
/// same state.
///
/// A loop waiting idle (for a commit, or the next due row) is alive by construction: it
/// wakes by a timer of the same runtime that runs the supervisor, so it needs no beats
/// meanwhile, which would only cost wake-ups. It counts as fresh until its wait should
/// have ended, plus the allowed age.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    last: Arc<AtomicI64>,
    idle_until: Arc<AtomicI64>,
    clock: Clock,
}

impl Heartbeat {
    /// A heartbeat on `clock` that has beaten now.
    pub fn new(clock: Clock) -> Self {
        let beat = Heartbeat {
            last: Arc::new(AtomicI64::new(0)),
            idle_until: Arc::new(AtomicI64::new(0)),
            clock,
        };
        beat.beat();
        beat
    }

    /// Records that the loop is alive.
    pub fn beat(&self) {
        self.last.store(self.clock.now_ms(), Ordering::Relaxed);
    }

    /// Records that the loop waits idle until `deadline_ms` at the latest.
    pub fn idle_until(&self, deadline_ms: i64) {
        self.idle_until.store(deadline_ms, Ordering::Relaxed);
    }

    /// Records that the loop's idle wait ended (it works, or fails, from now on).
    pub fn not_idle(&self) {
        self.idle_until.store(0, Ordering::Relaxed);
    }

    /// Whether the loop went round within `max_age`, or waits idle and its wait should
    /// have ended no longer than `max_age` ago.
    pub fn is_fresh(&self, max_age: Duration) -> bool {
        let max_age = max_age.as_millis() as i64;
        let idle_until = self.idle_until.load(Ordering::Relaxed);
        self.age_ms() <= max_age || (idle_until > 0 && self.clock.now_ms() <= idle_until + max_age)
    }

    /// Milliseconds since the last beat.
    pub fn age_ms(&self) -> i64 {
        self.clock.now_ms() - self.last.load(Ordering::Relaxed)
    }
}

/// Whether a writer (the completer) manages to write: the time (ms) its writes started
/// failing, 0 while they succeed. Cloning shares the same state.
#[derive(Debug, Clone)]
pub struct WriteHealth {
    failing_since: Arc<AtomicI64>,
    clock: Clock,
}

impl WriteHealth {
    /// A writer on `clock` whose writes succeed so far.
    pub fn new(clock: Clock) -> Self {
        WriteHealth {
            failing_since: Arc::new(AtomicI64::new(0)),
            clock,
        }
    }

    /// A write succeeded.
    pub fn ok(&self) {
        self.failing_since.store(0, Ordering::Relaxed);
    }

    /// A write failed; the first failure of a stretch is remembered.
    pub fn failed(&self) {
        let now = self.clock.now_ms().max(1);
        let _ = self
            .failing_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// How long writes have been failing, if they are.
    pub fn failing_for(&self) -> Option<Duration> {
        match self.failing_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(
                (self.clock.now_ms() - since).max(0) as u64
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_after_beat() {
        let clock = Clock::manual(10_000);
        let h = Heartbeat::new(clock.clone());
        assert!(h.is_fresh(Duration::from_secs(1)));
        clock.advance(Duration::from_millis(1_001));
        assert!(!h.is_fresh(Duration::from_secs(1)));
        assert_eq!(h.age_ms(), 1_001);
        h.clone().beat();
        assert!(h.is_fresh(Duration::from_secs(1)));
    }

    #[test]
    fn an_idle_loop_is_fresh_until_its_wait_should_have_ended() {
        let clock = Clock::manual(10_000);
        let h = Heartbeat::new(clock.clone());
        let max_age = Duration::from_secs(10);
        h.idle_until(10_000 + 30_000);
        clock.advance(Duration::from_secs(35));
        assert!(h.is_fresh(max_age), "waiting idle, due to wake 5 s ago");
        clock.advance(Duration::from_secs(6));
        assert!(
            !h.is_fresh(max_age),
            "its wait should have ended 11 s ago: stuck"
        );
        h.beat();
        assert!(h.is_fresh(max_age));
        h.not_idle();
        clock.advance(Duration::from_secs(11));
        assert!(!h.is_fresh(max_age), "not idle, no beat for 11 s");
    }

    #[test]
    fn write_health_remembers_the_start_of_a_failing_stretch() {
        let clock = Clock::manual(10_000);
        let w = WriteHealth::new(clock.clone());
        assert_eq!(w.failing_for(), None);
        w.failed();
        clock.advance(Duration::from_secs(3));
        w.clone().failed();
        assert_eq!(
            w.failing_for(),
            Some(Duration::from_secs(3)),
            "a later failure keeps the start"
        );
        w.ok();
        assert_eq!(w.failing_for(), None);
    }
}
