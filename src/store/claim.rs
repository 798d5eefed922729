//! Claiming due rows under a lease, lease renewal, rescue of expired leases and release of
//! unfinished rows at shutdown.

use std::time::Duration;

use sqlx::{Row, SqliteConnection};

use super::rows::{ClaimMeta, Claimed, QueueRow};
use super::{QueueName, Store, StoreError};

/// The scope of a pause that covers a whole queue.
pub const WHOLE_QUEUE: &str = "*";

/// Inputs of one claim.
#[derive(Debug, Clone)]
pub struct ClaimParams<'a> {
    /// Current time, ms.
    pub now: i64,
    /// Most rows to claim (the worker's free slots).
    pub limit: u32,
    /// Lease length.
    pub lease: Duration,
    /// A fresh token identifying this claim.
    pub claim_token: &'a str,
    /// This daemon instance (for lease renewal).
    pub claimed_by: &'a str,
}

/// What a claim produced.
#[derive(Debug)]
pub struct ClaimBatch<R> {
    /// The rows now held by this worker.
    pub rows: Vec<Claimed<R>>,
    /// Set when due rows exist that this claim could not take: the whole queue is paused
    /// (or its probe is in flight), or the due rows' sellers are paused. Their pause ends
    /// by time, which no commit announces, so an idle worker looks again soon.
    pub held_by_pause: bool,
}

fn claim_update(queue: QueueName, filter: &str) -> String {
    let t = queue.table();
    // INDEXED BY: the partial index over pending rows keeps the claim's cost independent of
    // how many finished rows the table holds; without statistics the planner may prefer the
    // status index and sort, so the choice is not left to it.
    // recent_attempts is guarded with json_valid so a hand-edited value cannot stop claims.
    format!(
        "UPDATE {t} SET status = 'running', attempts = attempts + 1, claim_token = ?1, \
         claimed_by = ?2, lease_expires_at = ?3, updated_at = ?4, \
         recent_attempts = json_insert(CASE WHEN json_valid(recent_attempts) THEN recent_attempts ELSE '[]' END, '$[#]', ?4) \
         WHERE id IN (SELECT id FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND next_attempt_at <= ?4 {filter} \
         ORDER BY next_attempt_at LIMIT ?5) RETURNING *"
    )
}

/// The claim statement used in steady state: due rows of sellers that are not paused.
pub fn claim_sql(queue: QueueName) -> String {
    let seller = queue.seller_expr();
    let t = queue.table();
    claim_update(
        queue,
        &format!(
            "AND {seller} NOT IN (SELECT p.scope FROM pauses p WHERE p.queue = ?6 AND p.scope <> '*' \
             AND (p.until_at > ?4 OR EXISTS (SELECT 1 FROM {t} x WHERE x.id = p.probe_row_id AND x.status = 'running')))"
        ),
    )
}

impl Store {
    /// Claims up to `limit` due rows in one short `BEGIN IMMEDIATE` transaction, honouring
    /// queue and seller pauses (an expired pause lets exactly one row through as a probe).
    pub async fn claim<R: QueueRow>(
        &self,
        p: &ClaimParams<'_>,
    ) -> Result<ClaimBatch<R>, StoreError> {
        let queue = R::QUEUE;
        // A read first: an empty queue never takes the write lock, however often it is woken.
        let t = queue.table();
        let due_sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND next_attempt_at <= ?1)"
        );
        let (any_due,): (bool,) = sqlx::query_as(&due_sql)
            .bind(p.now)
            .fetch_one(self.pool())
            .await?;
        if !any_due {
            return Ok(ClaimBatch {
                rows: Vec::new(),
                held_by_pause: false,
            });
        }
        let (_turn, mut tx) = self.begin_write().await?;
        let lease_until = p.now + p.lease.as_millis() as i64;
        let mut rows = Vec::new();

        match queue_pause_state(&mut tx, queue, p.now).await? {
            QueuePause::Active => {
                tx.commit().await?;
                return Ok(ClaimBatch {
                    rows,
                    held_by_pause: true,
                });
            }
            QueuePause::Expired => {
                // Probe: one row decides whether the pause is lifted.
                let probe =
                    claim_rows::<R>(&mut tx, &claim_sql(queue), p, lease_until, 1, None).await?;
                if let Some(first) = probe.first() {
                    set_probe(&mut tx, queue, WHOLE_QUEUE, first.meta.id).await?;
                }
                tx.commit().await?;
                return Ok(ClaimBatch {
                    rows: probe,
                    held_by_pause: true,
                });
            }
            QueuePause::None => {}
        }

        for seller in expired_seller_pauses(&mut tx, queue, p.now).await? {
            let sql = claim_update(queue, &format!("AND {} = ?6", queue.seller_expr()));
            let probe = claim_rows::<R>(&mut tx, &sql, p, lease_until, 1, Some(&seller)).await?;
            match probe.first() {
                Some(first) => set_probe(&mut tx, queue, &seller, first.meta.id).await?,
                None if !has_pending(&mut tx, queue, &seller).await? => {
                    delete_pause(&mut tx, queue, &seller).await?;
                }
                None => {}
            }
            rows.extend(probe);
        }

        let room = p.limit.saturating_sub(rows.len() as u32);
        if room > 0 {
            rows.extend(
                claim_rows::<R>(&mut tx, &claim_sql(queue), p, lease_until, room, None).await?,
            );
        }
        tx.commit().await?;
        Ok(ClaimBatch {
            held_by_pause: rows.is_empty(),
            rows,
        })
    }

    /// Extends the lease of the rows this daemon still works on (id and claim token). Says,
    /// per row, whether it was renewed: `false` means the claim was lost (the lease expired
    /// and the row was rescued or claimed again).
    pub async fn renew_leases(
        &self,
        queue: QueueName,
        held: &[(i64, String)],
        lease_until: i64,
    ) -> Result<Vec<bool>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "UPDATE {} SET lease_expires_at = ?1 WHERE id = ?2 AND claim_token = ?3 AND status = 'running'",
            queue.table()
        );
        self.update_held(&sql, held, lease_until).await
    }

    /// Returns rows whose lease expired (their daemon died) to `pending`, or to `failed`
    /// when that attempt was their last. Returns how many rows were rescued.
    pub async fn rescue_expired(
        &self,
        queue: QueueName,
        now: i64,
        default_max_attempts: u32,
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE {t} SET \
               status = CASE WHEN attempts >= COALESCE(max_attempts, ?2) THEN 'failed' ELSE 'pending' END, \
               finished_at = CASE WHEN attempts >= COALESCE(max_attempts, ?2) THEN ?1 ELSE NULL END, \
               next_attempt_at = ?1, updated_at = ?1, claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, \
               last_message = 'lease expired during attempt ' || attempts || ': the daemon holding it stopped; outcome unknown' \
             WHERE status = 'running' AND lease_expires_at <= ?1",
            t = queue.table()
        );
        let _turn = self.write_turn().await;
        let done = sqlx::query(&sql)
            .bind(now)
            .bind(default_max_attempts as i64)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// Rejects pending rows that can never fall due because `next_attempt_at` is not an
    /// integer (text such as `'soon'` or a BLOB, written around the CHECKs or by an old
    /// schema: such a value sorts after every number, so no claim ever takes the row).
    /// Served by the due index: text and BLOB values sort after all numbers, so the range
    /// `>= ''` holds exactly them. Returns how many rows were rejected.
    pub async fn reject_unschedulable(
        &self,
        queue: QueueName,
        now: i64,
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE {t} SET status = 'rejected', updated_at = ?1, finished_at = ?1, \
               claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, \
               last_message = 'next_attempt_at: ' || typeof(next_attempt_at) || ' value ' || \
                 substr(quote(next_attempt_at), 1, 42) || \
                 ' is not an INTEGER of Unix epoch milliseconds, so the row can never fall due' \
             WHERE id IN (SELECT id FROM {t} INDEXED BY {t}_due \
                          WHERE status = 'pending' AND next_attempt_at >= '')",
            t = queue.table()
        );
        let _turn = self.write_turn().await;
        let done = sqlx::query(&sql).bind(now).execute(self.pool()).await?;
        Ok(done.rows_affected())
    }

    /// Puts rows this worker holds back to `pending` without using up their attempt
    /// (graceful shutdown). Rows whose claim was lost meanwhile are left alone.
    pub async fn release(
        &self,
        queue: QueueName,
        held: &[(i64, String)],
        now: i64,
    ) -> Result<u64, StoreError> {
        if held.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE {} SET status = 'pending', attempts = MAX(attempts - 1, 0), next_attempt_at = ?1, updated_at = ?1, \
             claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
             WHERE id = ?2 AND claim_token = ?3 AND status = 'running'",
            queue.table()
        );
        let changed = self.update_held(&sql, held, now).await?;
        Ok(changed.into_iter().filter(|c| *c).count() as u64)
    }

    /// Runs `sql` (`?1` = `value`, `?2` = id, `?3` = claim token) for every held row in one
    /// write transaction; says, per row, whether it changed.
    async fn update_held(
        &self,
        sql: &str,
        held: &[(i64, String)],
        value: i64,
    ) -> Result<Vec<bool>, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let mut changed = Vec::with_capacity(held.len());
        for (id, token) in held {
            let done = sqlx::query(sql)
                .bind(value)
                .bind(id)
                .bind(token)
                .execute(&mut *tx)
                .await?;
            changed.push(done.rows_affected() == 1);
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// When the next pending row of `queue` becomes due (ms), if any is due after `now`.
    /// Rows already due but not claimed are held by a pause, so they are not counted.
    pub async fn next_due_after(
        &self,
        queue: QueueName,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let sql = format!(
            "SELECT MIN(next_attempt_at) FROM {} WHERE status = 'pending' AND next_attempt_at > ?1",
            queue.table()
        );
        let (at,): (Option<i64>,) = sqlx::query_as(&sql)
            .bind(now)
            .fetch_one(self.pool())
            .await?;
        Ok(at)
    }
}

async fn claim_rows<R: QueueRow>(
    conn: &mut SqliteConnection,
    sql: &str,
    p: &ClaimParams<'_>,
    lease_until: i64,
    limit: u32,
    seller: Option<&str>,
) -> Result<Vec<Claimed<R>>, StoreError> {
    let query = sqlx::query(sql)
        .bind(p.claim_token)
        .bind(p.claimed_by)
        .bind(lease_until)
        .bind(p.now)
        .bind(limit as i64);
    let query = match seller {
        Some(seller) => query.bind(seller.to_string()),
        None => query.bind(R::QUEUE.as_str()),
    };
    let fetched = query.fetch_all(&mut *conn).await?;
    let mut rows = Vec::with_capacity(fetched.len());
    for r in &fetched {
        let id: i64 = r.try_get("id")?;
        match decode::<R>(r) {
            Ok((meta, row)) => rows.push(Claimed { meta, row }),
            // A value the worker cannot read (written around the CHECKs, or by an older
            // schema) rejects that row alone instead of failing every claim.
            Err(e) => reject_unreadable(conn, R::QUEUE, id, p.now, &e).await?,
        }
    }
    Ok(rows)
}

fn decode<R: QueueRow>(r: &sqlx::sqlite::SqliteRow) -> Result<(ClaimMeta, R), sqlx::Error> {
    let meta = ClaimMeta {
        id: r.try_get("id")?,
        attempts: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        recent_attempts: r.try_get("recent_attempts")?,
        claim_token: r.try_get("claim_token")?,
    };
    Ok((meta, R::from_row(r)?))
}

async fn reject_unreadable(
    conn: &mut SqliteConnection,
    queue: QueueName,
    id: i64,
    now: i64,
    error: &sqlx::Error,
) -> Result<(), StoreError> {
    let reason = match error {
        sqlx::Error::ColumnDecode { index, .. } => {
            format!("column {index}: value of the wrong type")
        }
        other => format!("row unreadable: {other}"),
    };
    tracing::warn!(queue = queue.as_str(), row_id = id, %reason, "row rejected: it cannot be read");
    let sql = format!(
        "UPDATE {} SET status = 'rejected', last_message = ?2, updated_at = ?3, finished_at = ?3, \
         claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL WHERE id = ?1",
        queue.table()
    );
    sqlx::query(&sql)
        .bind(id)
        .bind(reason)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

enum QueuePause {
    None,
    Active,
    Expired,
}

async fn queue_pause_state(
    conn: &mut SqliteConnection,
    queue: QueueName,
    now: i64,
) -> Result<QueuePause, StoreError> {
    let sql = format!(
        "SELECT p.until_at, EXISTS (SELECT 1 FROM {t} x WHERE x.id = p.probe_row_id AND x.status = 'running') \
         FROM pauses p WHERE p.queue = ?1 AND p.scope = '*'",
        t = queue.table()
    );
    let row: Option<(i64, bool)> = sqlx::query_as(&sql)
        .bind(queue.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        None => QueuePause::None,
        Some((until, probing)) if until > now || probing => QueuePause::Active,
        Some(_) => QueuePause::Expired,
    })
}

async fn expired_seller_pauses(
    conn: &mut SqliteConnection,
    queue: QueueName,
    now: i64,
) -> Result<Vec<String>, StoreError> {
    let sql = format!(
        "SELECT p.scope FROM pauses p WHERE p.queue = ?1 AND p.scope <> '*' AND p.until_at <= ?2 \
         AND NOT EXISTS (SELECT 1 FROM {t} x WHERE x.id = p.probe_row_id AND x.status = 'running') LIMIT 16",
        t = queue.table()
    );
    let rows: Vec<(String,)> = sqlx::query_as(&sql)
        .bind(queue.as_str())
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().map(|(s,)| s).collect())
}

async fn set_probe(
    conn: &mut SqliteConnection,
    queue: QueueName,
    scope: &str,
    row_id: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE pauses SET probe_row_id = ?3 WHERE queue = ?1 AND scope = ?2")
        .bind(queue.as_str())
        .bind(scope)
        .bind(row_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn has_pending(
    conn: &mut SqliteConnection,
    queue: QueueName,
    seller: &str,
) -> Result<bool, StoreError> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE status = 'pending' AND {} = ?1)",
        queue.table(),
        queue.seller_expr()
    );
    let (exists,): (bool,) = sqlx::query_as(&sql)
        .bind(seller)
        .fetch_one(&mut *conn)
        .await?;
    Ok(exists)
}

pub(crate) async fn delete_pause(
    conn: &mut SqliteConnection,
    queue: QueueName,
    scope: &str,
) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM pauses WHERE queue = ?1 AND scope = ?2")
        .bind(queue.as_str())
        .bind(scope)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}
