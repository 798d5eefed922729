//! Following an accepted rebill to its invoice number (`[rebill] confirm`).
//!
//! Code 0 only says the gateway accepted the retry. Asking again is how the number is
//! learnt: for an invoice already issued `rebillingnew` answers code 100 with `invoice_no`
//! and `invoice_down_url`. So an accepted or in-progress row stays pending and is asked
//! again on a schedule counted from its first acceptance, until the number comes or
//! `confirm_for` runs out.

use std::time::Duration;

use crate::queue::action::{Action, Attempted, Outcome};
use crate::store::rows::ClaimMeta;

/// When to check an accepted row again, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmPolicy {
    /// Waits between checks from the first acceptance, in ms; the last one repeats.
    steps: Vec<i64>,
    /// How long a row is checked at most, in ms.
    period: i64,
}

impl ConfirmPolicy {
    /// A policy checking after each of `schedule` (the last repeating) for `period`. An
    /// empty schedule checks once an hour.
    pub fn new(schedule: &[Duration], period: Duration) -> ConfirmPolicy {
        let mut steps: Vec<i64> = schedule
            .iter()
            .map(|d| (d.as_millis() as i64).max(1))
            .collect();
        if steps.is_empty() {
            steps.push(3_600_000);
        }
        ConfirmPolicy {
            steps,
            period: period.as_millis() as i64,
        }
    }

    /// The policy `[rebill]` asks for, or `None` when `confirm` is off.
    pub fn from_config(rebill: &crate::config::RebillConfig) -> Option<ConfirmPolicy> {
        rebill.confirm.then(|| {
            let schedule: Vec<Duration> = rebill.confirm_schedule.iter().map(|d| **d).collect();
            ConfirmPolicy::new(&schedule, rebill.confirm_for)
        })
    }

    /// The next check after `now` for a row first accepted at `since`: the first point of
    /// the schedule still ahead, never past the end of the period. Counted from `since`
    /// rather than from the last check, so a check delayed by a pause or the daily cap
    /// does not push every later one back.
    pub fn next_check(&self, since: i64, now: i64) -> i64 {
        let end = since + self.period;
        let mut at = since;
        for step in self
            .steps
            .iter()
            .chain(std::iter::repeat(self.steps.last().unwrap_or(&3_600_000)))
        {
            at += step;
            if at > now || at >= end {
                break;
            }
        }
        at.min(end).max(now + 1)
    }

    /// What the answer means for a row being confirmed: an acceptance or "in progress"
    /// waits for the next check (or ends `done`/`accepted` when the period ran out); an
    /// "already issued" without the invoice's values asks once more; code 100 with them,
    /// and every other answer, is left as classified.
    pub fn apply(&self, mut attempted: Attempted, meta: &ClaimMeta, now: i64) -> Attempted {
        let since = meta.confirm_since.unwrap_or(now);
        let seen = match attempted.action {
            Action::Done(o @ (Outcome::Accepted | Outcome::InProgress)) => o,
            Action::Done(Outcome::Issued) if attempted.invoice_no.is_none() => {
                // One more call to learn the number; after that the row is done either way.
                if meta.outcome.as_deref() == Some(Outcome::Issued.as_str()) {
                    attempted.message = format!(
                        "issued, but the gateway did not say its number: {}",
                        attempted.message
                    );
                    return attempted;
                }
                Outcome::Issued
            }
            _ => return attempted,
        };
        if now >= since + self.period {
            attempted.action = Action::Done(Outcome::Accepted);
            attempted.message = format!(
                "accepted, but the invoice number was never seen in {} of checks; last answer: {}",
                humantime::format_duration(Duration::from_millis(self.period.max(0) as u64)),
                attempted.message
            );
            return attempted;
        }
        let at = if seen == Outcome::Issued {
            now + self.steps[0]
        } else {
            self.next_check(since, now)
        };
        attempted.action = Action::AwaitConfirmation {
            outcome: seen,
            since,
            at,
        };
        attempted.message = format!(
            "awaiting confirmation ({}): {}",
            match seen {
                Outcome::Issued => "issued; asking once more for its number",
                Outcome::InProgress => "invoicing in progress; invoice number not yet seen",
                _ => "accepted; invoice number not yet seen",
            },
            attempted.message
        );
        attempted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn policy() -> ConfirmPolicy {
        let schedule = [2, 10, 30, 60].map(|m| Duration::from_secs(m * 60));
        ConfirmPolicy::new(&schedule, Duration::from_secs(3 * 86400))
    }

    fn meta(outcome: Option<&str>, since: Option<i64>) -> ClaimMeta {
        ClaimMeta {
            id: 1,
            attempts: 1,
            max_attempts: None,
            recent_attempts: "[]".into(),
            claim_token: "t".into(),
            outcome: outcome.map(str::to_string),
            confirm_since: since,
        }
    }

    fn answer(action: Action, invoice_no: Option<&str>) -> Attempted {
        Attempted {
            action,
            http_status: Some(200),
            code: Some("0".into()),
            message: "重试成功".into(),
            invoice_no: invoice_no.map(str::to_string),
            invoice_down_url: invoice_no.map(|_| "https://pdf".to_string()),
        }
    }

    #[test]
    fn checks_follow_the_schedule_from_the_first_acceptance_and_repeat_the_last_step() {
        let p = policy();
        assert_eq!(p.next_check(0, 0), 2 * MIN);
        assert_eq!(p.next_check(0, 2 * MIN), 12 * MIN);
        assert_eq!(p.next_check(0, 12 * MIN), 42 * MIN);
        assert_eq!(p.next_check(0, 42 * MIN), 102 * MIN);
        assert_eq!(p.next_check(0, 102 * MIN), 162 * MIN);
        // A late check (held by a pause) goes to the next point, not a full step later.
        assert_eq!(p.next_check(0, 100 * MIN), 102 * MIN);
        // Never past the end of the period.
        let end = 3 * 86_400_000;
        assert_eq!(p.next_check(0, end - MIN), end);
    }

    #[test]
    fn an_acceptance_waits_without_using_an_attempt() {
        let a = policy().apply(
            answer(Action::Done(Outcome::Accepted), None),
            &meta(None, None),
            1000,
        );
        assert_eq!(
            a.action,
            Action::AwaitConfirmation {
                outcome: Outcome::Accepted,
                since: 1000,
                at: 1000 + 2 * MIN
            }
        );
        assert!(
            a.message.contains("awaiting confirmation") && a.message.contains("重试成功"),
            "{}",
            a.message
        );
        // Later checks keep the first acceptance's time.
        let a = policy().apply(
            answer(Action::Done(Outcome::InProgress), None),
            &meta(Some("accepted"), Some(1000)),
            1000 + 3 * MIN,
        );
        assert!(
            matches!(a.action, Action::AwaitConfirmation { outcome: Outcome::InProgress, since: 1000, at } if at == 1000 + 12 * MIN),
            "{:?}",
            a.action
        );
    }

    #[test]
    fn code_100_with_the_number_is_done() {
        let a = answer(Action::Done(Outcome::Issued), Some("2431"));
        assert_eq!(
            policy().apply(a.clone(), &meta(Some("accepted"), Some(0)), 5),
            a
        );
    }

    #[test]
    fn already_issued_without_values_asks_once_more_then_is_done() {
        let a = policy().apply(
            answer(Action::Done(Outcome::Issued), None),
            &meta(Some("accepted"), Some(0)),
            5 * MIN,
        );
        assert!(
            matches!(a.action, Action::AwaitConfirmation { outcome: Outcome::Issued, at, .. } if at == 7 * MIN),
            "{:?}",
            a.action
        );
        let a = policy().apply(
            answer(Action::Done(Outcome::Issued), None),
            &meta(Some("issued"), Some(0)),
            7 * MIN,
        );
        assert_eq!(a.action, Action::Done(Outcome::Issued));
        assert!(
            a.message.contains("did not say its number"),
            "{}",
            a.message
        );
    }

    #[test]
    fn the_period_running_out_leaves_it_done_accepted() {
        let end = 3 * 86_400_000;
        let a = policy().apply(
            answer(Action::Done(Outcome::InProgress), None),
            &meta(Some("in_progress"), Some(0)),
            end,
        );
        assert_eq!(a.action, Action::Done(Outcome::Accepted));
        assert!(a.message.contains("never seen in 3days"), "{}", a.message);
    }

    #[test]
    fn other_answers_follow_the_normal_rules() {
        for action in [
            Action::Retry { after: None },
            Action::Fail,
            Action::PauseSeller(Duration::from_secs(1)),
        ] {
            let a = answer(action, None);
            assert_eq!(
                policy().apply(a.clone(), &meta(Some("accepted"), Some(0)), 5),
                a
            );
        }
    }
}
