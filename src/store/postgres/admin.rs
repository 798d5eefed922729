//! Operator operations on PostgreSQL: counts, retry, cancel, pause, resume, the pause
//! list. Times shown are moved into the caller's clock; changes use the database's.

use super::{ClockBoundary, PgStore};
use crate::store::admin::{PauseInfo, QueueCounts, RowSummary};
use crate::store::{pauses, QueueName, StoreError};

/// What an operator's retry sets: pending again now, with a fresh attempt budget (the 24 h
/// window of recent attempts is kept).
const RETRY_SET: &str = "status = 'pending', outcome = NULL, attempts = 0, confirm_since = NULL, \
     next_attempt_at = invoice_worker_now_ms(), updated_at = invoice_worker_now_ms(), finished_at = NULL";

impl PgStore {
    /// Counts per status and the oldest due pending row's age.
    pub async fn counts(&self, queue: QueueName, now: i64) -> Result<QueueCounts, StoreError> {
        let mut counts = self.active_counts(queue, now).await?;
        counts.by_status.extend(self.finished_counts(queue).await?);
        Ok(counts)
    }

    /// The counts of `queue`'s active rows, the oldest due pending row's age (by the
    /// database's clock) and the rows awaiting confirmation, through the partial indexes.
    pub async fn active_counts(
        &self,
        queue: QueueName,
        _now: i64,
    ) -> Result<QueueCounts, StoreError> {
        let t = queue.table();
        let (pending, running, oldest, awaiting, now): (i64, i64, Option<i64>, i64, i64) =
            sqlx::query_as(&format!(
                "SELECT (SELECT COUNT(*) FROM {t} WHERE status = 'pending'), \
               (SELECT COUNT(*) FROM {t} WHERE status = 'running'), \
               (SELECT MIN(next_attempt_at) FROM {t} \
                  WHERE status = 'pending' AND next_attempt_at <= invoice_worker_now_ms()), \
               (SELECT COUNT(*) FROM {t} WHERE status = 'pending' AND outcome IS NOT NULL), \
               invoice_worker_now_ms()"
            ))
            .fetch_one(&self.pool)
            .await?;
        Ok(QueueCounts::of_active(
            queue,
            (pending, running, awaiting),
            oldest,
            now,
        ))
    }

    /// (status, count) of `queue`'s finished rows.
    pub async fn finished_counts(
        &self,
        queue: QueueName,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT status, COUNT(*) FROM {t} WHERE status IN ('done', 'failed', 'rejected', 'cancelled') \
             GROUP BY status ORDER BY status",
            t = queue.table()
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Whether the rescuer has anything to do: a running row whose lease expired by the
    /// database's clock. (A due time that is not an integer cannot exist here: the column
    /// is typed.)
    pub async fn rescue_needed(&self, queue: QueueName) -> Result<bool, StoreError> {
        let (needed,): (bool,) = sqlx::query_as(&format!(
            "SELECT EXISTS (SELECT 1 FROM {t} WHERE status = 'running' AND lease_expires_at <= invoice_worker_now_ms())",
            t = queue.table()
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(needed)
    }

    /// Makes finished rows (`failed`, `rejected`, `cancelled`) pending again with a fresh
    /// attempt budget (the 24 h window of recent attempts is kept). The ids changed.
    pub async fn retry(&self, queue: QueueName, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        self.update_ids(
            queue,
            RETRY_SET,
            "status IN ('failed', 'rejected', 'cancelled')",
            ids,
        )
        .await
    }

    /// Makes every `failed` row of `queue` (of one seller, when given) pending again;
    /// how many.
    pub async fn retry_failed(
        &self,
        queue: QueueName,
        seller: Option<&str>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(&format!(
            "UPDATE {t} SET {RETRY_SET} WHERE status = 'failed' AND ($1::TEXT IS NULL OR {seller} = $1)",
            t = queue.table(),
            seller = queue.seller_expr()
        ))
        .bind(seller)
        .execute(&self.pool)
        .await
        .map_err(StoreError::classify_pg)?;
        Ok(done.rows_affected())
    }

    /// Rows of a queue, newest first, optionally of one status. (Typed columns: a value of
    /// the wrong type cannot be stored, so `problem` is always empty here.)
    pub async fn list(
        &self,
        queue: QueueName,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RowSummary>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "{select} WHERE ($1::TEXT IS NULL OR status = $1) ORDER BY id DESC LIMIT $2",
            select = super::page::list_select(queue)
        ))
        .bind(status)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Cancels pending rows (running rows finish their attempt first). The ids changed.
    pub async fn cancel(&self, queue: QueueName, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        self.update_ids(
            queue,
            "status = 'cancelled', updated_at = invoice_worker_now_ms(), finished_at = invoice_worker_now_ms(), \
             last_message = 'cancelled by operator'",
            "status = 'pending'",
            ids,
        )
        .await
    }

    async fn update_ids(
        &self,
        queue: QueueName,
        set: &str,
        condition: &str,
        ids: &[i64],
    ) -> Result<Vec<i64>, StoreError> {
        let changed: Vec<(i64,)> = sqlx::query_as(&format!(
            "UPDATE {t} SET {set} WHERE id = ANY($1) AND {condition} RETURNING id",
            t = queue.table()
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::classify_pg)?;
        let changed: std::collections::HashSet<i64> = changed.into_iter().map(|(id,)| id).collect();
        Ok(ids
            .iter()
            .copied()
            .filter(|id| changed.contains(id))
            .collect())
    }

    /// Pauses a seller (or, with scope `*`, a whole queue) until `until` (caller's clock).
    pub async fn pause(
        &self,
        queue: QueueName,
        scope: &str,
        until: i64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let clock = ClockBoundary::read(&mut tx, now).await?;
        sqlx::query(
            "INSERT INTO pauses (queue, scope, until_at, reason, probe_row_id, created_at) VALUES ($1, $2, $3, $4, NULL, $5) \
             ON CONFLICT (queue, scope) DO UPDATE SET until_at = excluded.until_at, reason = excluded.reason, probe_row_id = NULL",
        )
        .bind(queue.as_str())
        .bind(scope)
        .bind(clock.inbound(until))
        .bind(reason)
        .bind(clock.database_now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::classify_pg)?;
        tx.commit().await?;
        Ok(())
    }

    /// Lifts a pause at once. True when there was one.
    pub async fn resume(
        &self,
        queue: QueueName,
        scope: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let clock = ClockBoundary::read(&mut tx, now).await?;
        let lifted = sqlx::query("DELETE FROM pauses WHERE queue = $1 AND scope = $2")
            .bind(queue.as_str())
            .bind(scope)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if lifted && self.alerts {
            let event = pauses::lifted_event(queue, scope, "resumed by an operator", now);
            super::queue::raise(&mut tx, &event, clock).await?;
        }
        tx.commit().await?;
        Ok(lifted)
    }

    /// Every recorded pause, its times in the caller's clock.
    pub async fn pauses(&self, now: i64) -> Result<Vec<PauseInfo>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        let mut all: Vec<PauseInfo> = sqlx::query_as(
            "SELECT queue, scope, until_at, reason, probe_row_id, created_at FROM pauses ORDER BY queue, scope",
        )
        .fetch_all(&mut *conn)
        .await?;
        for p in &mut all {
            p.until_at = clock.outbound(p.until_at);
            p.created_at = clock.outbound(p.created_at);
        }
        Ok(all)
    }
}
