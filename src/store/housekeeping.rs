//! Pruning finished rows in short batches, WAL checkpoints and `PRAGMA optimize`.

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
        let t = queue.table();
        let mut deleted = 0;
        for status in statuses {
            let sql = format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE status = ?1 AND finished_at < ?2 LIMIT ?3)"
            );
            let _turn = self.write_turn().await;
            deleted += sqlx::query(&sql)
                .bind(status)
                .bind(finished_before)
                .bind(batch as i64)
                .execute(self.pool())
                .await?
                .rows_affected();
        }
        Ok(deleted)
    }

    /// Checkpoints the WAL into the database file (PASSIVE: never waits for readers).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Checkpoints the WAL in this process's turn to write, so that none of this process's
    /// commits lands between the checkpoint and the next write (which may then restart the
    /// WAL from its beginning instead of appending). `truncate` also cuts the file to zero
    /// bytes; it waits for other processes' writers and readers on an older snapshot, but
    /// at most 100 ms (this process's writers wait meanwhile): a busy database is simply
    /// checkpointed at the next chance.
    pub async fn checkpoint_between_writes(&self, truncate: bool) -> Result<(), StoreError> {
        let sql = if truncate {
            "PRAGMA wal_checkpoint(TRUNCATE)"
        } else {
            "PRAGMA wal_checkpoint(PASSIVE)"
        };
        self.in_turn_briefly(sql, std::time::Duration::from_millis(100))
            .await
    }

    /// Lets SQLite refresh its query-planner statistics where useful.
    pub async fn optimize(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA optimize").execute(self.pool()).await?;
        Ok(())
    }
}
