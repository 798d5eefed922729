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

/// A batch smaller than this waits the store's
/// [`completion_linger`](Database::completion_linger) for more results before it is written.
const LINGER_BELOW: usize = 32;

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
    let linger = store.completion_linger();
    while next_batch(&mut rx, &mut finished, linger).await > 0 {
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

/// Waits for the next results and returns how many there are (0 once every sender is
/// gone). A batch smaller than [`LINGER_BELOW`] waits `linger` for more, so that a busy
/// queue writes fewer, larger batches.
async fn next_batch(
    rx: &mut mpsc::Receiver<Finished>,
    finished: &mut Vec<Finished>,
    linger: Duration,
) -> usize {
    if rx.recv_many(finished, MAX_BATCH).await == 0 {
        return 0;
    }
    if finished.len() < LINGER_BELOW && !linger.is_zero() {
        tokio::time::sleep(linger).await;
        while finished.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => finished.push(f),
                Err(_) => break,
            }
        }
    }
    finished.len()
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
    use crate::store::test_support::accepted;

    crate::store::on_both_databases!(
        a_refused_result_is_recorded_as_failed_and_the_rest_still_land
    );

    /// A batch holding a result the table refuses (on PostgreSQL that aborts the whole
    /// statement): the refused row is recorded as `failed` with the reason, the others land.
    async fn a_refused_result_is_recorded_as_failed_and_the_rest_still_land(store: Database) {
        use crate::store::admin::NewRebill;
        use crate::store::claim::ClaimParams;
        use crate::store::pauses::ClaimPlan;
        use crate::store::rows::RebillRow;
        for orderno in ["bad", "good"] {
            let job = NewRebill {
                orderno: orderno.into(),
                tax_num: "91310117568051222X".into(),
                max_attempts: None,
                not_before: Some(0),
            };
            store.enqueue_rebill(&job, now_ms()).await.unwrap();
        }
        let now = now_ms();
        let params = ClaimParams {
            now,
            limit: 2,
            lease: Duration::from_secs(30),
            claim_token: "tok",
            claimed_by: "test",
        };
        let claimed = store
            .claim::<RebillRow>(&params, |_| ClaimPlan::unpaused())
            .await
            .unwrap();
        assert_eq!(claimed.rows.len(), 2);
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
            store.clone(),
            QueueName::Rebill,
            rx,
            WriteHealth::new(crate::clock::Clock::system()),
        )
        .await;
        let sql = "SELECT orderno, status, last_message FROM rebill_orders ORDER BY orderno";
        let rows: Vec<(String, String, Option<String>)> = match &store {
            Database::Sqlite(s) => sqlx::query_as(sql).fetch_all(s.pool()).await.unwrap(),
            Database::Postgres(s) => sqlx::query_as(sql).fetch_all(s.pool()).await.unwrap(),
        };
        assert_eq!(rows[0].0, "bad");
        assert_eq!(rows[0].1, "failed");
        assert!(rows[0]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("could not be recorded"));
        assert_eq!((rows[1].0.as_str(), rows[1].1.as_str()), ("good", "done"));
    }

    /// Sends one result at once and one `after` later; returns the first batch's size.
    async fn first_batch(linger: Duration, after: Duration) -> usize {
        let (tx, mut rx) = mpsc::channel(8);
        tx.send(accepted(1, "tok", 0).into()).await.unwrap();
        let later = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            tx.send(accepted(2, "tok", 0).into()).await.unwrap();
        });
        let mut finished = Vec::new();
        let n = next_batch(&mut rx, &mut finished, linger).await;
        assert_eq!(n, finished.len());
        later.await.unwrap();
        n
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_batch_waits_the_linger_for_the_next_results() {
        let linger = Duration::from_millis(2);
        assert_eq!(first_batch(linger, Duration::from_millis(1)).await, 2);
        // One that comes after the linger goes in the next batch.
        assert_eq!(first_batch(linger, Duration::from_millis(5)).await, 1);
        // No linger (SQLite): written at once.
        assert_eq!(
            first_batch(Duration::ZERO, Duration::from_millis(1)).await,
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_does_not_wait() {
        let (tx, mut rx) = mpsc::channel(LINGER_BELOW + 1);
        for id in 0..LINGER_BELOW as i64 {
            tx.send(accepted(id, "tok", 0).into()).await.unwrap();
        }
        let mut finished = Vec::new();
        let started = tokio::time::Instant::now();
        let n = next_batch(&mut rx, &mut finished, Duration::from_secs(60)).await;
        assert_eq!(n, LINGER_BELOW);
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(tx);
        finished.clear();
        assert_eq!(
            next_batch(&mut rx, &mut finished, Duration::from_secs(60)).await,
            0
        );
    }
}
