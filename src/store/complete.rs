//! Writing the result of attempts back, in batches, each row guarded by its claim token.

use super::claim::delete_pause;
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

/// A pause to record together with a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseRecord {
    /// The seller key, or [`super::claim::WHOLE_QUEUE`].
    pub scope: String,
    /// End of the pause, ms.
    pub until: i64,
    /// Why (the server's message).
    pub reason: String,
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
    /// A pause to start.
    pub pause: Option<PauseRecord>,
    /// Current time, ms.
    pub now: i64,
}

fn complete_sql(queue: QueueName) -> String {
    let invoice = match queue {
        QueueName::Rebill => "invoice_no = COALESCE(?9, invoice_no), invoice_down_url = COALESCE(?10, invoice_down_url), ",
        QueueName::Title => "",
    };
    format!(
        "UPDATE {t} SET status = ?3, outcome = ?4, \
           next_attempt_at = CASE WHEN ?3 = 'pending' THEN ?5 ELSE next_attempt_at END, \
           attempts = CASE WHEN ?6 THEN MAX(attempts - 1, 0) ELSE attempts END, \
           last_code = ?7, last_message = ?8, {invoice}\
           recent_attempts = COALESCE(?11, recent_attempts), updated_at = ?12, \
           finished_at = CASE WHEN ?3 = 'pending' THEN NULL ELSE ?12 END, \
           claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
         WHERE id = ?1 AND claim_token = ?2 AND status = 'running'",
        t = queue.table()
    )
}

/// The whole batch in one statement: the completions travel as one JSON array, each row is
/// updated under the same guard as in [`complete_sql`] (`id`, `claim_token`, `running`),
/// and `RETURNING id` says which were applied. The unary `+` keeps SQLite from driving the
/// join from the status index: json_each is read once and each row found by its id.
fn complete_batch_sql(queue: QueueName) -> String {
    format!(
        "UPDATE {t} AS r SET status = j.status, outcome = j.outcome, \
           next_attempt_at = CASE WHEN j.status = 'pending' THEN j.next_attempt_at ELSE r.next_attempt_at END, \
           attempts = CASE WHEN j.refund THEN MAX(r.attempts - 1, 0) ELSE r.attempts END, \
           last_code = j.last_code, last_message = j.last_message, \
           invoice_no = COALESCE(j.invoice_no, r.invoice_no), \
           invoice_down_url = COALESCE(j.invoice_down_url, r.invoice_down_url), \
           recent_attempts = COALESCE(j.recent_attempts, r.recent_attempts), updated_at = j.now, \
           finished_at = CASE WHEN j.status = 'pending' THEN NULL ELSE j.now END, \
           claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
         FROM (SELECT value ->> 'id' AS id, value ->> 'token' AS token, value ->> 'status' AS status, \
                 value ->> 'outcome' AS outcome, value ->> 'next' AS next_attempt_at, \
                 value ->> 'refund' AS refund, value ->> 'code' AS last_code, \
                 value ->> 'message' AS last_message, value ->> 'invoice_no' AS invoice_no, \
                 value ->> 'url' AS invoice_down_url, value ->> 'recent' AS recent_attempts, \
                 value ->> 'now' AS now \
               FROM json_each(?1)) AS j \
         WHERE r.id = j.id AND +r.claim_token = j.token AND +r.status = 'running' \
         RETURNING id",
        t = queue.table()
    )
}

fn batch_json(items: &[Completion]) -> String {
    let rows: Vec<serde_json::Value> = items
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id, "token": c.claim_token, "status": c.status.as_str(), "outcome": c.outcome,
                "next": c.next_attempt_at, "refund": c.refund_attempt, "code": c.last_code,
                "message": c.last_message, "invoice_no": c.invoice_no, "url": c.invoice_down_url,
                "recent": c.recent_attempts, "now": c.now,
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
        let sql = complete_sql(queue);
        let (_turn, mut tx) = self.begin_write().await?;
        let mut applied = Vec::with_capacity(items.len());
        // Most batches run with no pause at all; skip the per-row probe lookup then.
        let (pauses,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM pauses WHERE queue = ?1")
            .bind(queue.as_str())
            .fetch_one(&mut *tx)
            .await?;
        // The common case, no pause anywhere: one statement for the whole batch.
        if pauses == 0 && items.iter().all(|c| c.pause.is_none()) {
            let done: Vec<(i64,)> = sqlx::query_as(&complete_batch_sql(queue))
                .bind(batch_json(items))
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::classify)?;
            tx.commit().await?;
            let done: std::collections::HashSet<i64> = done.into_iter().map(|(id,)| id).collect();
            return Ok(items.iter().map(|c| done.contains(&c.id)).collect());
        }
        for c in items {
            let done = sqlx::query(&sql)
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
                .execute(&mut *tx)
                .await
                .map_err(StoreError::classify)?;
            let ok = done.rows_affected() == 1;
            applied.push(ok);
            if !ok {
                continue;
            }
            match &c.pause {
                Some(pause) => {
                    sqlx::query(
                        "INSERT INTO pauses (queue, scope, until_at, reason, probe_row_id, created_at) \
                         VALUES (?1, ?2, ?3, ?4, NULL, ?5) \
                         ON CONFLICT (queue, scope) DO UPDATE SET until_at = MAX(until_at, excluded.until_at), \
                         reason = excluded.reason, probe_row_id = NULL",
                    )
                    .bind(queue.as_str())
                    .bind(&pause.scope)
                    .bind(pause.until)
                    .bind(&pause.reason)
                    .bind(c.now)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::classify)?;
                }
                // A rejected row was never sent, so as a probe it proves nothing either way.
                None if pauses == 0 || c.status == FinalStatus::Rejected => {}
                None => {
                    // A probe that did not ask for a pause again lifts the pause it probed.
                    let probed: Vec<(String,)> = sqlx::query_as(
                        "SELECT scope FROM pauses WHERE queue = ?1 AND probe_row_id = ?2",
                    )
                    .bind(queue.as_str())
                    .bind(c.id)
                    .fetch_all(&mut *tx)
                    .await?;
                    for (scope,) in probed {
                        delete_pause(&mut tx, queue, &scope).await?;
                    }
                }
            }
        }
        tx.commit().await?;
        Ok(applied)
    }
}
