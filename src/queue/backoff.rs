//! When a failed row is tried again: exponential backoff with jitter, an attempt budget and
//! a cap on attempts per 24 h (Nuonuo allows 20 retries of one order a day).

use std::time::Duration;

use crate::config::RetryConfig;

/// 24 hours in milliseconds: the window of the per-day cap.
pub const DAY_MS: i64 = 24 * 3600 * 1000;

/// The retry policy, built from `[retry]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delay after the first attempt.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Spread as a fraction (0.2 = ±20 %).
    pub jitter: f64,
    /// Attempts before `failed` (rows may override).
    pub max_attempts: u32,
    /// Most attempts in any 24 h.
    pub max_per_day: u32,
}

impl From<&RetryConfig> for Backoff {
    fn from(c: &RetryConfig) -> Self {
        Backoff {
            base: c.base_delay,
            max: c.max_delay,
            jitter: c.jitter,
            max_attempts: c.max_attempts,
            max_per_day: c.max_per_day,
        }
    }
}

impl Backoff {
    /// The delay after `attempt` (1-based) failed: base × 2^(attempt−1), capped, then spread
    /// by `unit` ∈ [0, 1) mapped to [−jitter, +jitter].
    pub fn delay(&self, attempt: i64, unit: f64) -> Duration {
        let exp = (attempt.max(1) - 1).min(62) as u32;
        let raw = self.base.as_secs_f64() * 2f64.powi(exp as i32);
        let capped = raw.min(self.max.as_secs_f64());
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }

    /// Whether a row that has used `attempts` may not be tried again.
    pub fn exhausted(&self, attempts: i64, row_max: Option<i64>) -> bool {
        attempts >= row_max.unwrap_or(self.max_attempts as i64)
    }

    /// The earliest time (ms) the per-day cap allows another attempt, given the times of
    /// recent attempts (which include the one just made).
    pub fn daily_cap_allows_at(&self, recent: &[i64], now: i64) -> Option<i64> {
        let mut window: Vec<i64> = recent
            .iter()
            .copied()
            .filter(|t| *t > now - DAY_MS)
            .collect();
        if window.len() < self.max_per_day as usize {
            return None;
        }
        window.sort_unstable();
        // The attempt that must leave the window before another fits in it.
        let leaving = window[window.len() - self.max_per_day as usize];
        Some(leaving + DAY_MS)
    }

    /// When to try again (ms) after a failed attempt: the backoff, or a fixed delay, pushed
    /// back as far as the per-day cap requires.
    pub fn next_attempt_at(
        &self,
        now: i64,
        attempts: i64,
        fixed: Option<Duration>,
        recent: &[i64],
        unit: f64,
    ) -> i64 {
        let delay = fixed.unwrap_or_else(|| self.delay(attempts, unit));
        let by_backoff = now + delay.as_millis() as i64;
        match self.daily_cap_allows_at(recent, now) {
            Some(at) => by_backoff.max(at),
            None => by_backoff,
        }
    }
}

/// Parses the stored JSON list of attempt times, keeping those inside the last 24 h.
pub fn recent_attempts(json: &str, now: i64) -> Vec<i64> {
    serde_json::from_str::<Vec<i64>>(json)
        .unwrap_or_default()
        .into_iter()
        .filter(|t| *t > now - DAY_MS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff::from(&RetryConfig::default())
    }

    #[test]
    fn doubles_from_base_and_caps() {
        let b = policy();
        assert_eq!(b.delay(1, 0.5), Duration::from_secs(30));
        assert_eq!(b.delay(2, 0.5), Duration::from_secs(60));
        assert_eq!(b.delay(5, 0.5), Duration::from_secs(480));
        assert_eq!(b.delay(8, 0.5), Duration::from_secs(3600));
        assert_eq!(b.delay(50, 0.5), Duration::from_secs(3600));
        assert_eq!(b.delay(i64::MAX, 0.5), Duration::from_secs(3600));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let b = policy();
        assert_eq!(b.delay(1, 0.0), Duration::from_secs(24));
        assert_eq!(b.delay(1, 1.0), Duration::from_secs(36));
        for i in 0..100 {
            let d = b.delay(3, i as f64 / 100.0).as_secs_f64();
            assert!((96.0..=144.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn attempt_budget_respects_row_override() {
        let b = policy();
        assert!(!b.exhausted(49, None));
        assert!(b.exhausted(50, None));
        assert!(b.exhausted(3, Some(3)));
        assert!(!b.exhausted(2, Some(3)));
    }

    #[test]
    fn never_more_than_max_per_day_in_any_24h() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(1),
            jitter: 0.0,
            max_attempts: 1000,
            max_per_day: 20,
        };
        // Simulate a row that always fails: each attempt happens at the time allowed.
        let mut now = 0i64;
        let mut times = Vec::new();
        for attempt in 1..=100 {
            times.push(now);
            let recent: Vec<i64> = times
                .iter()
                .copied()
                .filter(|t| *t > now - DAY_MS)
                .collect();
            now = b.next_attempt_at(now, attempt, None, &recent, 0.5);
        }
        for (i, start) in times.iter().enumerate() {
            let in_window = times[i..].iter().filter(|t| **t < start + DAY_MS).count();
            assert!(
                in_window <= 20,
                "{in_window} attempts in the 24 h from {start}"
            );
        }
        // And it keeps going rather than stalling forever.
        assert!(times[99] < 6 * DAY_MS);
    }

    #[test]
    fn fixed_delay_overrides_backoff() {
        let b = policy();
        assert_eq!(
            b.next_attempt_at(1000, 1, Some(Duration::from_secs(5)), &[1000], 0.5),
            6000
        );
    }

    #[test]
    fn recent_attempts_parsing_is_lenient() {
        assert_eq!(recent_attempts("[1,2,3]", 10), vec![1, 2, 3]);
        assert_eq!(recent_attempts("garbage", 10), Vec::<i64>::new());
        assert_eq!(
            recent_attempts("[1, 100000000]", DAY_MS + 10),
            vec![100000000]
        );
    }
}
