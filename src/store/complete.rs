//! Writing the result of attempts back, in batches, each row guarded by its claim token.

use super::history::AttemptFacts;
use super::pauses::{self, PauseChange};
use super::{QueueName, Store, StoreError};

/// The state a finished attempt leaves the row in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    /// Back to the queue, due at `next_attempt_at`.
    Pending,
    /// Finished successfully (`outcome` says how).
    Done,
    /// Attempts exhausted or a permanent error.
    Failed,
    /// The row itself is invalid and was never sent.
    Rejected,
}

impl FinalStatus {
    /// The `status` column value.
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Pending => "pending",
            FinalStatus::Done => "done",
            FinalStatus::Failed => "failed",
            FinalStatus::Rejected => "rejected",
        }
    }
}

/// The result of one attempt, as the store writes it.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Row id.
    pub id: i64,
    /// The claim token the attempt was made under.
    pub claim_token: String,
    /// New status.
    pub status: FinalStatus,
    /// `outcome` for done rows.
    pub outcome: Option<&'static str>,
    /// When a pending row is due next, ms.
    pub next_attempt_at: i64,
    /// Give the attempt back (the failure was not the row's: pauses, shutdown).
    pub refund_attempt: bool,
    /// Remote code.
    pub last_code: Option<String>,
    /// Reason or remote message.
    pub last_message: Option<String>,
    /// rebill: invoice number (code 100).
    pub invoice_no: Option<String>,
    /// rebill: PDF URL (code 100).
    pub invoice_down_url: Option<String>,
    /// Pruned list of recent attempt times, when it changed.
    pub recent_attempts: Option<String>,
    /// What the result does to pauses (the queue's pause policy decides).
    pub pause: PauseChange,
    /// When confirmation began, for a row left pending to await it (kept when `None`).
    pub confirm_since: Option<i64>,
    /// The attempt behind this result, for the history (none for results that are not
    /// attempts, such as a test's).
    pub attempt: Option<AttemptFacts>,
    /// Current time, ms.
    pub now: i64,
}

fn batch_json(items: &[Completion]) -> String {
    let rows: Vec<serde_json::Value> = items
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id, "token": c.claim_token, "status": c.status.as_str(), "outcome": c.outcome,
                "next": c.next_attempt_at, "refund": c.refund_attempt, "code": c.last_code,
                "message": c.last_message, "invoice_no": c.invoice_no, "url": c.invoice_down_url,
                "recent": c.recent_attempts, "since": c.confirm_since, "now": c.now,
            })
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

impl Store {
    /// Applies a batch of completions in one `BEGIN IMMEDIATE` transaction. Each update only
    /// touches its row while the claim token still matches; the result says, per item,
    /// whether it was applied (`false` = the claim was lost to a lease expiry).
    pub async fn complete(
        &self,
        queue: QueueName,
        items: &[Completion],
    ) -> Result<Vec<bool>, StoreError> {
        let sql = self.sql(queue);
        let (_turn, mut tx) = self.begin_write().await?;
        // The common case, no pause anywhere and none to start: one statement for the whole
        // batch (a probe's lift has nothing to lift then).
        let starts = items
            .iter()
            .any(|c| matches!(c.pause, PauseChange::Start(_)));
        if !starts && !pauses::any(&mut tx, queue).await? {
            let done: Vec<(i64,)> = sqlx::query_as(&sql.complete_batch)
                .bind(batch_json(items))
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::classify)?;
            let done: std::collections::HashSet<i64> = done.into_iter().map(|(id,)| id).collect();
            let applied: Vec<bool> = items.iter().map(|c| done.contains(&c.id)).collect();
            super::history::record_batch(&mut tx, self, queue, items, &applied).await?;
            tx.commit().await?;
            return Ok(applied);
        }
        let mut applied = Vec::with_capacity(items.len());
        for c in items {
            let done = sqlx::query(&sql.complete)
                .bind(c.id)
                .bind(&c.claim_token)
                .bind(c.status.as_str())
                .bind(c.outcome)
                .bind(c.next_attempt_at)
                .bind(c.refund_attempt)
                .bind(&c.last_code)
                .bind(&c.last_message)
                .bind(&c.invoice_no)
                .bind(&c.invoice_down_url)
                .bind(&c.recent_attempts)
                .bind(c.now)
                .bind(c.confirm_since)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::classify)?;
            let ok = done.rows_affected() == 1;
            applied.push(ok);
            if !ok {
                continue;
            }
            match &c.pause {
                PauseChange::Start(pause) => {
                    if pauses::start(&mut tx, queue, pause, c.now).await? && self.alerts_on() {
                        let event = pauses::paused_event(queue, pause, c.now);
                        super::outbox::raise(&mut tx, &event).await?;
                    }
                }
                PauseChange::LiftProbed => {
                    let lifted = pauses::lift_probed(&mut tx, queue, c.id).await?;
                    if let Some(scope) = lifted.filter(|_| self.alerts_on()) {
                        let how = format!("row {} went through", c.id);
                        let event = pauses::lifted_event(queue, &scope, &how, c.now);
                        super::outbox::raise(&mut tx, &event).await?;
                    }
                }
                PauseChange::Nothing => {}
            }
        }
        super::history::record_batch(&mut tx, self, queue, items, &applied).await?;
        tx.commit().await?;
        Ok(applied)
    }
}
