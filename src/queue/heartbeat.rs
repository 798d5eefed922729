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
}
