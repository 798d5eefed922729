//! Turns one attempt's result into the row's next state: the pure part of completion.

use crate::store::complete::{Completion, FinalStatus};
use crate::store::pauses::{PauseChange, PauseRecord, WHOLE_QUEUE};
use crate::store::rows::ClaimMeta;
use crate::validate::Rejection;

use super::action::{Action, Attempted};
use super::backoff::{recent_attempts, Backoff};

/// What handling a claimed row produced.
#[derive(Debug, Clone)]
pub enum Processed {
    /// The row is invalid and was not sent.
    Rejected(Rejection),
    /// The row was sent (or sending was attempted).
    Attempted(Attempted),
}

/// Plans the completion of a claimed row. `unit` ∈ [0, 1) drives the jitter, `seller` is the
/// row's pause scope.
pub fn plan(
    meta: &ClaimMeta,
    seller: &str,
    processed: &Processed,
    backoff: &Backoff,
    now: i64,
    unit: f64,
) -> Completion {
    let recent = recent_attempts(&meta.recent_attempts, now);
    let mut c = Completion {
        id: meta.id,
        claim_token: meta.claim_token.clone(),
        status: FinalStatus::Pending,
        outcome: None,
        next_attempt_at: now,
        refund_attempt: false,
        last_code: None,
        last_message: None,
        invoice_no: None,
        invoice_down_url: None,
        recent_attempts: serde_json::to_string(&recent).ok(),
        pause: PauseChange::Nothing,
        confirm_since: None,
        attempt: None,
        now,
    };
    let attempted = match processed {
        Processed::Rejected(rejection) => {
            c.status = FinalStatus::Rejected;
            c.last_message = Some(rejection.to_string());
            return c;
        }
        Processed::Attempted(a) => a,
    };
    c.last_code = attempted.code.clone();
    c.last_message = Some(attempted.message.clone());
    match &attempted.action {
        Action::Done(outcome) => {
            c.status = FinalStatus::Done;
            c.outcome = Some(outcome.as_str());
            c.invoice_no = attempted.invoice_no.clone();
            c.invoice_down_url = attempted.invoice_down_url.clone();
        }
        Action::Fail => c.status = FinalStatus::Failed,
        Action::AwaitConfirmation { outcome, since, at } => {
            c.outcome = Some(outcome.as_str());
            c.confirm_since = Some(*since);
            c.refund_attempt = true;
            c.invoice_no = attempted.invoice_no.clone();
            c.invoice_down_url = attempted.invoice_down_url.clone();
            // Each check is a call, so it counts toward the per-day cap like any other.
            c.next_attempt_at = match backoff.daily_cap_allows_at(&recent, now) {
                Some(cap) => cap.max(*at),
                None => *at,
            };
        }
        Action::Retry { after } => {
            if backoff.exhausted(meta.attempts, meta.max_attempts) {
                c.status = FinalStatus::Failed;
                c.last_message = Some(format!(
                    "gave up after {} attempts: {}",
                    meta.attempts, attempted.message
                ));
            } else {
                c.next_attempt_at =
                    backoff.next_attempt_at(now, meta.attempts, *after, &recent, unit);
            }
        }
        Action::PauseSeller(duration) | Action::PauseQueue(duration) => {
            // Not the row's fault: it keeps its attempt and waits for the pause to end.
            c.refund_attempt = true;
            let scope = match attempted.action {
                Action::PauseSeller(_) => seller.to_string(),
                _ => WHOLE_QUEUE.to_string(),
            };
            let until = now + duration.as_millis() as i64;
            // The per-day cap still applies to the row itself.
            if let Some(at) = backoff.daily_cap_allows_at(&recent, now) {
                c.next_attempt_at = at;
            }
            c.pause = super::pauses::change_after(
                processed,
                Some(PauseRecord {
                    scope,
                    until,
                    reason: attempted.message.clone(),
                }),
            );
            return c;
        }
    }
    c.pause = super::pauses::change_after(processed, None);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use crate::queue::action::Outcome;
    use std::time::Duration;

    fn meta(attempts: i64) -> ClaimMeta {
        ClaimMeta {
            id: 7,
            attempts,
            max_attempts: None,
            recent_attempts: "[1000]".into(),
            claim_token: "tok".into(),
            outcome: None,
            confirm_since: None,
        }
    }

    fn attempted(action: Action) -> Processed {
        Processed::Attempted(Attempted {
            action,
            http_status: Some(200),
            code: Some("1".into()),
            message: "msg".into(),
            invoice_no: Some("N".into()),
            invoice_down_url: Some("U".into()),
        })
    }

    fn backoff() -> Backoff {
        Backoff::from(&RetryConfig::default())
    }

    #[test]
    fn done_records_outcome_and_invoice() {
        let c = plan(
            &meta(1),
            "S",
            &attempted(Action::Done(Outcome::Issued)),
            &backoff(),
            2000,
            0.5,
        );
        assert_eq!(c.status, FinalStatus::Done);
        assert_eq!(c.outcome, Some("issued"));
        assert_eq!(c.invoice_no.as_deref(), Some("N"));
        assert_eq!(c.claim_token, "tok");
    }

    #[test]
    fn retry_backs_off_then_fails_when_exhausted() {
        let c = plan(
            &meta(1),
            "S",
            &attempted(Action::Retry { after: None }),
            &backoff(),
            2000,
            0.5,
        );
        assert_eq!(c.status, FinalStatus::Pending);
        assert_eq!(c.next_attempt_at, 2000 + 30_000);
        let c = plan(
            &meta(50),
            "S",
            &attempted(Action::Retry { after: None }),
            &backoff(),
            2000,
            0.5,
        );
        assert_eq!(c.status, FinalStatus::Failed);
        assert!(c
            .last_message
            .as_deref()
            .is_some_and(|m| m.contains("50 attempts")));
    }

    #[test]
    fn pauses_refund_the_attempt_and_record_scope() {
        let c = plan(
            &meta(3),
            "TAX",
            &attempted(Action::PauseSeller(Duration::from_secs(60))),
            &backoff(),
            2000,
            0.5,
        );
        assert!(c.refund_attempt);
        assert_eq!(c.status, FinalStatus::Pending);
        let PauseChange::Start(pause) = c.pause else {
            panic!("no pause started: {:?}", c.pause)
        };
        assert_eq!((pause.scope.as_str(), pause.until), ("TAX", 62_000));
        let c = plan(
            &meta(3),
            "TAX",
            &attempted(Action::PauseQueue(Duration::from_secs(1))),
            &backoff(),
            2000,
            0.5,
        );
        assert!(
            matches!(&c.pause, PauseChange::Start(p) if p.scope == "*"),
            "{:?}",
            c.pause
        );
    }

    #[test]
    fn awaiting_confirmation_stays_pending_without_using_an_attempt() {
        let c = plan(
            &meta(3),
            "S",
            &attempted(Action::AwaitConfirmation {
                outcome: Outcome::Accepted,
                since: 1500,
                at: 9000,
            }),
            &backoff(),
            2000,
            0.5,
        );
        assert_eq!(c.status, FinalStatus::Pending);
        assert_eq!(c.outcome, Some("accepted"));
        assert_eq!((c.confirm_since, c.next_attempt_at), (Some(1500), 9000));
        assert!(c.refund_attempt);
        // Twenty calls in the last day: the next check waits for the oldest to age out.
        let mut full = meta(3);
        full.recent_attempts =
            serde_json::to_string(&(0..20).map(|i| 1000 + i).collect::<Vec<i64>>()).unwrap();
        let c = plan(
            &full,
            "S",
            &attempted(Action::AwaitConfirmation {
                outcome: Outcome::InProgress,
                since: 1500,
                at: 9000,
            }),
            &backoff(),
            2000,
            0.5,
        );
        assert_eq!(c.next_attempt_at, 1000 + 86_400_000);
    }

    #[test]
    fn rejection_names_the_field() {
        let c = plan(
            &meta(1),
            "S",
            &Processed::Rejected(Rejection::new("orderno", "empty")),
            &backoff(),
            2000,
            0.5,
        );
        assert_eq!(c.status, FinalStatus::Rejected);
        assert_eq!(c.last_message.as_deref(), Some("orderno: empty"));
    }
}
