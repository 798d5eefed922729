//! The attempt history and one row in full on PostgreSQL (`show`, the console's row
//! page). Times are shown as recorded: the database's clock, which every daemon shares.

use sqlx::Row;

use super::PgStore;
use crate::store::history::{HistoryEntry, MinuteCount, HISTORY_LIMIT};
use crate::store::show::RowDetail;
use crate::store::{QueueName, StoreError};

impl PgStore {
    /// Row `id`'s recorded attempts, oldest first: the newest [`HISTORY_LIMIT`] of them.
    pub async fn attempt_history(
        &self,
        queue: QueueName,
        id: i64,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM (SELECT attempt, started_at, duration_ms, http_status, code, message, \
             action, status, instance, recorded_at, id FROM attempt_history \
             WHERE queue = $1 AND row_id = $2 ORDER BY id DESC LIMIT $3) h ORDER BY id",
        )
        .bind(queue.as_str())
        .bind(id)
        .bind(HISTORY_LIMIT)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HistoryEntry {
                    attempt: r.try_get("attempt")?,
                    started_at: r.try_get("started_at")?,
                    duration_ms: r.try_get("duration_ms")?,
                    http_status: r.try_get("http_status")?,
                    code: r.try_get("code")?,
                    message: r.try_get("message")?,
                    action: r.try_get("action")?,
                    status: r.try_get("status")?,
                    instance: r.try_get("instance")?,
                    recorded_at: r.try_get("recorded_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// `queue`'s attempts per minute from `since` (epoch ms) on, oldest first.
    pub async fn attempts_per_minute(
        &self,
        queue: QueueName,
        since: i64,
    ) -> Result<Vec<MinuteCount>, StoreError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT minute, attempts FROM attempt_minutes WHERE queue = $1 AND minute >= $2 ORDER BY minute",
        )
        .bind(queue.as_str())
        .bind(since.div_euclid(60_000))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(minute, attempts)| MinuteCount { minute, attempts })
            .collect())
    }

    /// Deletes per-minute counts older than `before` (epoch ms); how many.
    pub async fn prune_minutes(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM attempt_minutes WHERE minute < $1")
            .bind(before.div_euclid(60_000))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes history whose row is gone. The delete triggers always fire here (there is
    /// no `REPLACE`), so this finds only what was written around them, by hand.
    pub async fn prune_orphaned_history(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for queue in QueueName::ALL {
            total += sqlx::query(&format!(
                "DELETE FROM attempt_history h WHERE h.queue = $1 \
                 AND NOT EXISTS (SELECT 1 FROM {t} r WHERE r.id = h.row_id)",
                t = queue.table()
            ))
            .bind(queue.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(total)
    }

    /// Refreshes the planner's statistics of the queue tables.
    pub async fn optimize(&self) -> Result<(), StoreError> {
        sqlx::query("ANALYZE rebill_orders, title_submissions, attempt_history")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Row `id` of `queue` with every column (as text, private title fields masked) and
    /// its history; `None` if there is no such row.
    pub async fn show(&self, queue: QueueName, id: i64) -> Result<Option<RowDetail>, StoreError> {
        let table = queue.table();
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT column_name::TEXT FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&self.pool)
        .await?;
        let select = names
            .iter()
            .map(|(name,)| format!("\"{name}\"::TEXT"))
            .collect::<Vec<_>>()
            .join(", ");
        let row = sqlx::query(&format!("SELECT {select} FROM {table} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut columns = Vec::with_capacity(names.len());
        for (i, (name,)) in names.into_iter().enumerate() {
            columns.push((name, row.try_get(i)?));
        }
        let history = self.attempt_history(queue, id).await?;
        Ok(Some(RowDetail::masked(queue, id, columns, history)))
    }
}
