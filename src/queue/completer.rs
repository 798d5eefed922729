//! Writes completions in batches: one transaction for everything that finished since the
//! last write, each row still guarded by its claim token.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::complete::Completion;
use crate::store::{QueueName, Store};

/// Most completions written in one transaction.
const MAX_BATCH: usize = 512;

/// Runs until every sender is dropped and the channel is drained. A failed write is
/// retried (the rows stay `running` under their lease meanwhile), never dropped.
pub async fn run(store: Store, queue: QueueName, mut rx: mpsc::Receiver<Completion>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut delay = Duration::from_millis(50);
        loop {
            match store.complete(queue, &batch).await {
                Ok(applied) => {
                    for (c, ok) in batch.iter().zip(applied) {
                        if !ok {
                            tracing::warn!(
                                queue = queue.as_str(),
                                row_id = c.id,
                                "claim lost: the lease expired and the row was claimed again; this result was not written"
                            );
                            metrics::counter!("invoice_worker_lost_claims_total", "queue" => queue.as_str()).increment(1);
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::error!(queue = queue.as_str(), rows = batch.len(), error = %e, "cannot write results; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.clear();
    }
}
