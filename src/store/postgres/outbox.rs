//! The alert outbox on PostgreSQL: the same rows and rules as the SQLite store's
//! (`store/outbox.rs`), claimed with `FOR UPDATE SKIP LOCKED`, and the monitors' memory kept
//! in the database's clock, so that daemons on hosts whose clocks disagree raise each alert
//! once.

use std::time::Duration;

use super::{ClockBoundary, PgStore};
use crate::alerts::{Event, MAX_EXAMPLES};
use crate::store::outbox::{
    rows_failed_event, stuck_event, AlertDelivery, AlertReport, ClaimedAlert,
};
use crate::store::{QueueName, StoreError};

/// `$1` token, `$2` now, `$3` lease end, `$4` limit.
const CLAIM: &str = "WITH due AS (SELECT id FROM alert_outbox WHERE status = 'pending' AND next_attempt_at <= $2 \
       ORDER BY next_attempt_at, id LIMIT $4 FOR UPDATE SKIP LOCKED) \
     UPDATE alert_outbox AS a SET claim_token = $1, attempts = a.attempts + 1, next_attempt_at = $3 \
     FROM due WHERE a.id = due.id \
     RETURNING a.id, a.event, a.body, a.attempts, a.delivered_to, a.created_at";

/// `$1` id, `$2` token, `$3` status, `$4` next attempt, `$5` delivered to, `$6` error, `$7` now.
const FINISH: &str = "UPDATE alert_outbox SET status = $3, next_attempt_at = $4, delivered_to = $5, last_error = $6, \
     claim_token = NULL, finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE $7 END \
     WHERE id = $1 AND claim_token = $2 AND status = 'pending'";

/// `$1` name, `$2` error or NULL, `$3` now.
const RECORD_TARGET: &str = "INSERT INTO alert_targets (name, failing_since, last_error, last_ok_at, updated_at) \
     VALUES ($1, CASE WHEN $2::TEXT IS NULL THEN NULL ELSE $3 END, $2, CASE WHEN $2::TEXT IS NULL THEN $3 END, $3) \
     ON CONFLICT (name) DO UPDATE SET \
       failing_since = CASE WHEN $2::TEXT IS NULL THEN NULL ELSE COALESCE(alert_targets.failing_since, $3) END, \
       last_error = COALESCE($2, alert_targets.last_error), \
       last_ok_at = CASE WHEN $2::TEXT IS NULL THEN $3 ELSE alert_targets.last_ok_at END, updated_at = $3";

impl PgStore {
    /// Writes `event` to the outbox in a transaction of its own.
    pub async fn raise_alert(&self, event: &Event) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let clock = ClockBoundary::read(&mut tx, event.at).await?;
        super::queue::raise(&mut tx, event, clock).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Claims up to `limit` due alerts for `lease` under `token`; deliverers of other
    /// daemons claiming at once take other alerts.
    pub async fn claim_alerts(
        &self,
        now: i64,
        lease: Duration,
        token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedAlert>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let clock = ClockBoundary::read(&mut tx, now).await?;
        let db_now = clock.database_now;
        let mut rows: Vec<ClaimedAlert> = sqlx::query_as(CLAIM)
            .bind(token)
            .bind(db_now)
            .bind(db_now.saturating_add(lease.as_millis() as i64))
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        for row in &mut rows {
            row.created_at = clock.outbound(row.created_at);
        }
        Ok(rows)
    }

    /// Records a delivery round. False when the claim was lost.
    pub async fn finish_alert(
        &self,
        id: i64,
        token: &str,
        delivered_to: &[String],
        result: &AlertDelivery,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let clock = ClockBoundary::read(&mut tx, now).await?;
        let (status, next, error) = result.row_values(now);
        let delivered = serde_json::to_string(delivered_to).unwrap_or_else(|_| "[]".into());
        let done = sqlx::query(FINISH)
            .bind(id)
            .bind(token)
            .bind(status)
            .bind(clock.inbound(next))
            .bind(delivered)
            .bind(error)
            .bind(clock.database_now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// When the next undelivered alert is due, in the caller's clock (`now`).
    pub async fn next_alert_due(&self, now: i64) -> Result<Option<i64>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        let (at,): (Option<i64>,) = sqlx::query_as(
            "SELECT MIN(next_attempt_at) FROM alert_outbox WHERE status = 'pending'",
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(at.map(|t| clock.outbound(t)))
    }

    /// Remembers how a post to target `name` went (`error` = `None` for success).
    pub async fn record_target(
        &self,
        name: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        sqlx::query(RECORD_TARGET)
            .bind(name)
            .bind(error)
            .bind(clock.database_now)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// The outbox and the targets' health, for `status`, times in the caller's clock.
    pub async fn alert_report(&self, now: i64) -> Result<AlertReport, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        let (pending, oldest, given_up): (i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE status = 'pending'), \
                    MIN(created_at) FILTER (WHERE status = 'pending'), \
                    COUNT(*) FILTER (WHERE status = 'given_up') \
             FROM alert_outbox WHERE status IN ('pending', 'given_up')",
        )
        .fetch_one(&mut *conn)
        .await?;
        let (last_error,): (Option<String>,) = sqlx::query_as(
            "SELECT (SELECT last_error FROM alert_outbox WHERE status = 'pending' AND last_error IS NOT NULL \
             ORDER BY id DESC LIMIT 1)",
        )
        .fetch_one(&mut *conn)
        .await?;
        let mut targets: Vec<crate::store::outbox::TargetHealth> = sqlx::query_as(
            "SELECT name, failing_since, last_error, last_ok_at FROM alert_targets ORDER BY name",
        )
        .fetch_all(&mut *conn)
        .await?;
        for t in &mut targets {
            t.failing_since = t.failing_since.map(|at| clock.outbound(at));
            t.last_ok_at = t.last_ok_at.map(|at| clock.outbound(at));
        }
        Ok(AlertReport {
            pending,
            oldest_pending_at: oldest.map(|at| clock.outbound(at)),
            given_up,
            last_error,
            targets,
        })
    }

    /// Raises one "rows failed" digest for `queue` when rows failed since the last one and
    /// the last one is at least `every` old (the database's clock), once across daemons:
    /// the window's end is changed only where it is still the value read.
    pub async fn digest_failed(
        &self,
        queue: QueueName,
        now: i64,
        every: Duration,
    ) -> Result<Option<Event>, StoreError> {
        let key = format!("rows_failed:{}", queue.as_str());
        let sql = self.sql(queue);
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        let db_now = clock.database_now;
        let Some(since) = state(&mut conn, &key).await? else {
            init_state(&mut conn, &key, db_now, db_now).await?;
            return Ok(None);
        };
        if db_now < since.saturating_add(every.as_millis() as i64) {
            return Ok(None);
        }
        let (count,): (i64,) = sqlx::query_as(&sql.failed_between_count)
            .bind(since)
            .bind(db_now)
            .fetch_one(&mut *conn)
            .await?;
        if count == 0 {
            return Ok(None);
        }
        let rows: Vec<(i64, String, String, String)> = sqlx::query_as(&sql.failed_between)
            .bind(since)
            .bind(db_now)
            .bind(MAX_EXAMPLES as i64)
            .fetch_all(&mut *conn)
            .await?;
        drop(conn);
        let event = rows_failed_event(queue, now, count, clock.outbound(since), rows);
        Ok(self
            .swap_and_raise(&key, since, db_now, &event, clock)
            .await?
            .then_some(event))
    }

    /// Raises "queue stuck" when the oldest due row of a seller that is not paused has
    /// waited longer than `after` (the database's clock), and "queue recovered" when that
    /// ends; each change once across daemons.
    pub async fn watch_stuck(
        &self,
        queue: QueueName,
        now: i64,
        after: Duration,
    ) -> Result<Option<Event>, StoreError> {
        let key = format!("stuck:{}", queue.as_str());
        let sql = self.sql(queue);
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        let db_now = clock.database_now;
        let (oldest,): (Option<i64>,) = sqlx::query_as(&sql.oldest_due_unpaused)
            .bind(db_now)
            .bind(queue.as_str())
            .fetch_one(&mut *conn)
            .await?;
        let (queue_paused,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pauses WHERE queue = $1 AND scope = '*')")
                .bind(queue.as_str())
                .fetch_one(&mut *conn)
                .await?;
        let stuck_since = oldest
            .filter(|at| !queue_paused && *at <= db_now.saturating_sub(after.as_millis() as i64));
        let was = state(&mut conn, &key).await?.unwrap_or(0);
        let event = match (was, stuck_since) {
            (0, Some(since)) => {
                let (count,): (i64,) = sqlx::query_as(&sql.due_count)
                    .bind(db_now)
                    .fetch_one(&mut *conn)
                    .await?;
                stuck_event(queue, now, clock.outbound(since), Some(count))
            }
            (stuck_at, None) if stuck_at != 0 => {
                stuck_event(queue, now, clock.outbound(stuck_at), None)
            }
            _ => return Ok(None),
        };
        init_state(&mut conn, &key, 0, db_now).await?;
        drop(conn);
        let value = if stuck_since.is_some() { db_now } else { 0 };
        Ok(self
            .swap_and_raise(&key, was, value, &event, clock)
            .await?
            .then_some(event))
    }

    /// In one transaction: changes `key` from `read` to `value` and raises `event`; false
    /// (and nothing written) when another daemon changed `key` first.
    async fn swap_and_raise(
        &self,
        key: &str,
        read: i64,
        value: i64,
        event: &Event,
        clock: ClockBoundary,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE alert_state SET value = $2, updated_at = $4 WHERE key = $1 AND value = $3",
        )
        .bind(key)
        .bind(value)
        .bind(read)
        .bind(clock.database_now)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        super::queue::raise(&mut tx, event, clock).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes up to `batch` delivered or given-up alerts finished before `before` (the
    /// caller's clock).
    pub async fn prune_alerts(&self, before: i64, batch: u32, now: i64) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        Ok(sqlx::query(
            "DELETE FROM alert_outbox WHERE id IN (SELECT id FROM alert_outbox \
             WHERE status IN ('delivered', 'given_up') AND finished_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(clock.inbound(before))
        .bind(batch as i64)
        .execute(&mut *conn)
        .await?
        .rows_affected())
    }
}

/// The monitor state under `key`.
async fn state(conn: &mut sqlx::PgConnection, key: &str) -> Result<Option<i64>, StoreError> {
    let value: Option<(i64,)> = sqlx::query_as("SELECT value FROM alert_state WHERE key = $1")
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(value.map(|(v,)| v))
}

/// Stores `value` under `key` unless a value is there already.
async fn init_state(
    conn: &mut sqlx::PgConnection,
    key: &str,
    value: i64,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO alert_state (key, value, updated_at) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(value)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
