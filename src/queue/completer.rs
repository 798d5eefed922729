//! Writes completions in batches: one transaction for everything that finished since the
//! last write, each row still guarded by its claim token.

use std::time::Duration;

use tokio::sync::mpsc;

use super::heartbeat::WriteHealth;
use super::leases::Unwritten;
use super::pause_gate::Closed;
use crate::store::complete::{Completion, FinalStatus};
use crate::store::driver::QueueStore as _;
use crate::store::pauses::PauseChange;
use crate::store::{Database, QueueName, StoreError};

/// Most completions written in one transaction.
const MAX_BATCH: usize = 512;

/// A finished attempt's result on its way to the database, with what must last until it
/// is written: the row's hold (so that its lease is still renewed) and, for a result that
/// starts a pause, the closed [`PauseGate`](super::pause_gate::PauseGate). Both are let go
/// once the result is written, or given up on.
#[derive(Debug)]
pub struct Finished {
    /// The result.
    pub completion: Completion,
    /// The row, still held.
    pub row: Option<Unwritten>,
    /// The pause gate, closed while a pause-starting result is unwritten.
    pub pause: Option<Closed>,
}

impl From<Completion> for Finished {
    /// A result with nothing held for it (one that is not an attempt's).
    fn from(completion: Completion) -> Self {
        Finished {
            completion,
            row: None,
            pause: None,
        }
    }
}

/// Runs until every sender is dropped and the channel is drained. A batch that cannot be
/// written is retried (the rows stay `running` under their lease meanwhile); a single
/// result the database refuses is recorded as `failed` with the reason, so one bad value
/// cannot stall the queue.
pub async fn run(
    store: Database,
    queue: QueueName,
    mut rx: mpsc::Receiver<Finished>,
    health: WriteHealth,
) {
    let mut finished = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut finished, MAX_BATCH).await > 0 {
        // Dropped at the end of this round, once the batch is written.
        let (batch, _kept): (Vec<Completion>, Vec<_>) = finished
            .drain(..)
            .map(|f| (f.completion, (f.row, f.pause)))
            .unzip();
        let mut delay = Duration::from_millis(50);
        loop {
            let started = std::time::Instant::now();
            match store.complete(queue, &batch).await {
                Ok(applied) => {
                    tracing::debug!(
                        queue = queue.as_str(),
                        rows = batch.len(),
                        took_ms = started.elapsed().as_secs_f64() * 1e3,
                        "results written"
                    );
                    health.ok();
                    report_lost(queue, &batch, &applied);
                    break;
                }
                Err(StoreError::Constraint(reason)) => {
                    tracing::error!(queue = queue.as_str(), rows = batch.len(), %reason, "a result was refused by the database; writing rows one by one");
                    one_by_one(&store, queue, &batch).await;
                    break;
                }
                Err(e) if e.is_busy() => {
                    // Other processes' writers held the lock past the busy timeout: try
                    // again at once (a stretch of it still shows in the health check).
                    health.failed();
                    tracing::debug!(queue = queue.as_str(), rows = batch.len(), error = %e, "results met a busy database; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    health.failed();
                    tracing::error!(queue = queue.as_str(), rows = batch.len(), error = %e, "cannot write results; retrying");
                    tokio::time::sleep(delay).await;
                    // At most a second: once the database is back, these results must be
                    // written before the rescuer hands their rows (whose leases ran out
                    // meanwhile) to another attempt, which would send them again.
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

async fn one_by_one(store: &Database, queue: QueueName, batch: &[Completion]) {
    for c in batch {
        let single = std::slice::from_ref(c);
        let refused = match store.complete(queue, single).await {
            Ok(applied) => {
                report_lost(queue, single, &applied);
                continue;
            }
            Err(StoreError::Constraint(reason)) => reason,
            Err(e) => {
                // The lease returns the row to the queue if this stays unwritable.
                tracing::error!(queue = queue.as_str(), row_id = c.id, error = %e, "cannot write result");
                continue;
            }
        };
        let fallback = Completion {
            status: FinalStatus::Failed,
            outcome: None,
            invoice_no: None,
            invoice_down_url: None,
            // As the refused result would have: a sent probe lifts its pause (a rejected
            // row, never sent, lifts it too here; it is failed either way).
            pause: PauseChange::LiftProbed,
            confirm_since: None,
            refund_attempt: false,
            last_message: Some(format!(
                "result could not be recorded ({refused}); last answer: {}",
                c.last_message.as_deref().unwrap_or("")
            )),
            ..c.clone()
        };
        if let Err(e) = store.complete(queue, std::slice::from_ref(&fallback)).await {
            tracing::error!(queue = queue.as_str(), row_id = c.id, error = %e, "cannot record the failure either");
        }
    }
}

fn report_lost(queue: QueueName, batch: &[Completion], applied: &[bool]) {
    for (c, ok) in batch.iter().zip(applied) {
        if !ok {
            tracing::warn!(
                queue = queue.as_str(),
                row_id = c.id,
                "claim lost: the lease expired and the row was claimed again; this result was not written"
            );
            metrics::counter!("invoice_worker_lost_claims_total", "queue" => queue.as_str())
                .increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now_ms;
    use crate::store::test_support::{accepted, claim_rebill, insert_due, temp_store};

    #[tokio::test]
    async fn a_refused_result_is_recorded_as_failed_and_the_rest_still_land() {
        let (_d, store) = temp_store().await;
        insert_due(&store, &["bad", "good"]).await;
        let now = now_ms();
        let claimed = claim_rebill(&store, now, 2, Duration::from_secs(30), "tok").await;
        let (tx, rx) = mpsc::channel(8);
        for c in &claimed.rows {
            let mut result = accepted(c.meta.id, "tok", now);
            if c.row.orderno == "bad" {
                // "sent" is not an outcome the rebill table accepts.
                result.outcome = Some("sent");
            }
            tx.send(result.into()).await.unwrap();
        }
        drop(tx);
        run(
            store.clone().into(),
            QueueName::Rebill,
            rx,
            WriteHealth::new(crate::clock::Clock::system()),
        )
        .await;
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT orderno, status, last_message FROM rebill_orders ORDER BY orderno",
        )
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(rows[0].0, "bad");
        assert_eq!(rows[0].1, "failed");
        assert!(rows[0]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("could not be recorded"));
        assert_eq!((rows[1].0.as_str(), rows[1].1.as_str()), ("good", "done"));
    }
}
