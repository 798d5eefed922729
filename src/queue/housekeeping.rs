//! Housekeeping: delete finished rows past their retention in short batches, checkpoint the
//! WAL, refresh planner statistics. Run on a cron schedule by the daemon.

use std::time::Duration;

use crate::config::HousekeepingConfig;
use crate::store::{QueueName, Store, StoreError};

/// What one housekeeping pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `done` rows deleted.
    pub done_deleted: u64,
    /// `failed`, `rejected` and `cancelled` rows deleted.
    pub failed_deleted: u64,
}

/// Runs one pass with `now` (ms) as the current time.
pub async fn run_once(
    store: &Store,
    cfg: &HousekeepingConfig,
    now: i64,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let done_before = now - cfg.done_retention.as_millis() as i64;
    let failed_before = now - cfg.failed_retention.as_millis() as i64;
    for queue in QueueName::ALL {
        report.done_deleted += prune(store, queue, &["done"], done_before, cfg.batch_size).await?;
        report.failed_deleted += prune(
            store,
            queue,
            &["failed", "rejected", "cancelled"],
            failed_before,
            cfg.batch_size,
        )
        .await?;
    }
    store.checkpoint().await?;
    store.optimize().await?;
    Ok(report)
}

async fn prune(
    store: &Store,
    queue: QueueName,
    statuses: &[&str],
    before: i64,
    batch: u32,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let deleted = store.prune_batch(queue, statuses, before, batch).await?;
        total += deleted;
        if deleted == 0 {
            return Ok(total);
        }
        // Let writers in other processes take the lock between batches.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    const DAY: i64 = 86_400_000;

    #[tokio::test]
    async fn deletes_only_rows_past_their_retention() {
        let (_d, store) = temp_store().await;
        let now = 1_000 * DAY;
        for (orderno, status, finished) in [
            ("old-done", "done", now - 31 * DAY),
            ("new-done", "done", now - 29 * DAY),
            ("old-failed", "failed", now - 181 * DAY),
            ("mid-failed", "failed", now - 100 * DAY),
            ("old-rejected", "rejected", now - 200 * DAY),
        ] {
            sqlx::query("INSERT INTO rebill_orders (orderno, tax_num, status, finished_at) VALUES (?1, 'T', ?2, ?3)")
                .bind(orderno)
                .bind(status)
                .bind(finished)
                .execute(store.pool())
                .await
                .expect("insert");
        }
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES ('pending', 'T')")
            .execute(store.pool())
            .await
            .expect("insert");
        let cfg = HousekeepingConfig {
            batch_size: 1,
            ..HousekeepingConfig::default()
        };
        let report = run_once(&store, &cfg, now).await.expect("housekeeping");
        assert_eq!(
            report,
            Report {
                done_deleted: 1,
                failed_deleted: 2
            }
        );
        let left: Vec<(String,)> =
            sqlx::query_as("SELECT orderno FROM rebill_orders ORDER BY orderno")
                .fetch_all(store.pool())
                .await
                .expect("rows");
        let left: Vec<String> = left.into_iter().map(|(o,)| o).collect();
        assert_eq!(left, ["mid-failed", "new-done", "pending"]);
    }
}
