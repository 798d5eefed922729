//! Pruning finished rows in short batches and `PRAGMA optimize`.

use super::{QueueName, Store, StoreError};

impl Store {
    /// Deletes up to `batch` rows of `queue` in one of `statuses` that finished before
    /// `finished_before` (ms). Returns how many were deleted; call again until it is 0, so
    /// the write lock is never held for long.
    pub async fn prune_batch(
        &self,
        queue: QueueName,
        statuses: &[&str],
        finished_before: i64,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for status in statuses {
            let _turn = self.write_turn().await;
            deleted += sqlx::query(&self.sql(queue).prune)
                .bind(status)
                .bind(finished_before)
                .bind(batch as i64)
                .execute(self.pool())
                .await?
                .rows_affected();
        }
        Ok(deleted)
    }

    /// Lets SQLite refresh its query-planner statistics where useful.
    pub async fn optimize(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA optimize").execute(self.pool()).await?;
        Ok(())
    }
}
