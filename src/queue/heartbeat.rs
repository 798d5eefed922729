//! Liveness of the worker loops, for the systemd watchdog and `/healthz`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::store::now_ms;

/// The time (ms) a loop last went round. Cloning shares the same clock.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat(Arc<AtomicI64>);

impl Heartbeat {
    /// A heartbeat that has beaten now.
    pub fn new() -> Self {
        let beat = Heartbeat::default();
        beat.beat();
        beat
    }

    /// Records that the loop is alive.
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the loop went round within `max_age`.
    pub fn is_fresh(&self, max_age: Duration) -> bool {
        now_ms() - self.0.load(Ordering::Relaxed) <= max_age.as_millis() as i64
    }

    /// Milliseconds since the last beat.
    pub fn age_ms(&self) -> i64 {
        now_ms() - self.0.load(Ordering::Relaxed)
    }
}

/// Whether a writer (the completer) manages to write: the time (ms) its writes started
/// failing, 0 while they succeed. Cloning shares the same state.
#[derive(Debug, Clone, Default)]
pub struct WriteHealth(Arc<AtomicI64>);

impl WriteHealth {
    /// A write succeeded.
    pub fn ok(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// A write failed; the first failure of a stretch is remembered.
    pub fn failed(&self) {
        let _ = self
            .0
            .compare_exchange(0, now_ms().max(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// How long writes have been failing, if they are.
    pub fn failing_for(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis((now_ms() - since).max(0) as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_after_beat() {
        let h = Heartbeat::new();
        assert!(h.is_fresh(Duration::from_secs(1)));
        h.0.store(0, Ordering::Relaxed);
        assert!(!h.is_fresh(Duration::from_secs(1)));
        h.clone().beat();
        assert!(h.is_fresh(Duration::from_secs(1)));
    }

    #[test]
    fn write_health_remembers_the_start_of_a_failing_stretch() {
        let w = WriteHealth::default();
        assert_eq!(w.failing_for(), None);
        w.failed();
        let first = w.0.load(Ordering::Relaxed);
        w.clone().failed();
        assert_eq!(
            w.0.load(Ordering::Relaxed),
            first,
            "a later failure keeps the start"
        );
        assert!(w.failing_for().is_some());
        w.ok();
        assert_eq!(w.failing_for(), None);
    }
}
