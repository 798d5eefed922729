//! Claiming due rows under a lease, following the pause plan the queue's policy makes.

use std::time::Duration;

use sqlx::{Row, SqliteConnection};

use super::pauses::{self, ClaimPlan, PauseView, WHOLE_QUEUE};
use super::rows::{decode_claimed, unreadable_reason, ClaimMeta, Claimed, QueueRow};
use super::sql::QueueSql;
use super::{QueueName, Store, StoreError};

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

impl Store {
    /// Claims up to `p.limit` due rows in one short `BEGIN IMMEDIATE` transaction. `plan`
    /// (the queue's pause policy) turns the pauses that matter into what to claim: nothing,
    /// probes, and/or the due rows of scopes that are not paused.
    pub async fn claim<R: QueueRow>(
        &self,
        p: &ClaimParams<'_>,
        plan: impl FnOnce(&[PauseView]) -> ClaimPlan,
    ) -> Result<ClaimBatch<R>, StoreError> {
        let queue = R::QUEUE;
        let sql = self.sql(queue);
        // A read first: an empty queue never takes the write lock, however often it is woken.
        let (any_due,): (bool,) = sqlx::query_as(&sql.any_due)
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
        let plan = plan(&pauses::for_claim(&mut tx, sql, queue, p.now).await?);
        let mut rows = Vec::new();
        if !plan.hold {
            for step in &plan.probes {
                let (statement, key) = if step.scope == WHOLE_QUEUE {
                    (&sql.claim, queue.as_str())
                } else {
                    (&sql.claim_seller, step.scope.as_str())
                };
                let probe =
                    claim_rows::<R>(&mut tx, sql, self.history_on(), statement, p, 1, key).await?;
                match probe.into_iter().next() {
                    Some(row) => {
                        if pauses::mark_probe(&mut tx, sql, queue, &step.scope, row.meta.id, p.now)
                            .await?
                        {
                            rows.push(row);
                        } else {
                            // Another claim probes this pause already: this row waits too.
                            unclaim(&mut tx, sql, &row.meta).await?;
                        }
                    }
                    None if step.lift_when_idle => {
                        let lifted =
                            pauses::lift_idle_seller(&mut tx, sql, queue, &step.scope, p.now)
                                .await?;
                        if lifted && self.alerts_on() {
                            let how = "ended with no row left to send";
                            let event = pauses::lifted_event(queue, &step.scope, how, p.now);
                            super::outbox::raise(&mut tx, &event).await?;
                        }
                    }
                    None => {}
                }
            }
            let room = p.limit.saturating_sub(rows.len() as u32);
            if plan.claim_rest && room > 0 {
                let key = queue.as_str();
                rows.extend(
                    claim_rows::<R>(&mut tx, sql, self.history_on(), &sql.claim, p, room, key)
                        .await?,
                );
            }
        }
        tx.commit().await?;
        Ok(ClaimBatch {
            held_by_pause: !plan.claim_rest || rows.is_empty(),
            rows,
        })
    }

    /// The query plan SQLite uses for `queue`'s steady-state claim, one line per step (the
    /// tests and the benchmark check that it stays on the due index).
    pub async fn explain_claim(&self, queue: QueueName) -> Result<Vec<String>, StoreError> {
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {}", self.sql(queue).claim))
                .bind("token")
                .bind("daemon")
                .bind(0i64)
                .bind(0i64)
                .bind(64i64)
                .bind(queue.as_str())
                .fetch_all(self.pool())
                .await?;
        Ok(plan.into_iter().map(|(_, _, _, step)| step).collect())
    }
}

/// Runs a claim `statement` for at most `limit` rows; `key` fills `?6` (the queue name or
/// a seller). Rows that cannot be read are rejected on the spot (and the rejection recorded
/// in the history when `history`).
async fn claim_rows<R: QueueRow>(
    conn: &mut SqliteConnection,
    sql: &QueueSql,
    history: bool,
    statement: &str,
    p: &ClaimParams<'_>,
    limit: u32,
    key: &str,
) -> Result<Vec<Claimed<R>>, StoreError> {
    let lease_until = p.now + p.lease.as_millis() as i64;
    let fetched = sqlx::query(statement)
        .bind(p.claim_token)
        .bind(p.claimed_by)
        .bind(lease_until)
        .bind(p.now)
        .bind(limit as i64)
        .bind(key)
        .fetch_all(&mut *conn)
        .await?;
    let mut rows = Vec::with_capacity(fetched.len());
    for r in &fetched {
        let id: i64 = r.try_get("id")?;
        match decode_claimed::<_, R>(r) {
            Ok((meta, row)) => rows.push(Claimed { meta, row }),
            // A value the worker cannot read (written around the CHECKs, or by an older
            // schema) rejects that row alone instead of failing every claim.
            Err(e) => reject_unreadable(conn, sql, R::QUEUE, id, p.now, &e, history).await?,
        }
    }
    Ok(rows)
}

/// Puts back a row this transaction just claimed, as if it never had been.
async fn unclaim(
    conn: &mut SqliteConnection,
    sql: &QueueSql,
    meta: &ClaimMeta,
) -> Result<(), StoreError> {
    sqlx::query(&sql.unclaim)
        .bind(meta.id)
        .bind(&meta.claim_token)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn reject_unreadable(
    conn: &mut SqliteConnection,
    sql: &QueueSql,
    queue: QueueName,
    id: i64,
    now: i64,
    error: &sqlx::Error,
    history: bool,
) -> Result<(), StoreError> {
    let reason = unreadable_reason(error);
    tracing::warn!(queue = queue.as_str(), row_id = id, %reason, "row rejected: it cannot be read");
    if history {
        sqlx::query(&sql.history_of_unreadable)
            .bind(id)
            .bind(&reason)
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(&sql.reject_unreadable)
        .bind(id)
        .bind(reason)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::pauses::{PauseChange, ProbeStep};
    use crate::store::rows::RebillRow;
    use crate::store::test_support::{accepted, temp_store};

    const SELLER: &str = "91310117568051222X";

    async fn insert(store: &Store, orderno: &str) -> i64 {
        sqlx::query(
            "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) VALUES (?1, ?2, 0)",
        )
        .bind(orderno)
        .bind(SELLER)
        .execute(store.pool())
        .await
        .unwrap()
        .last_insert_rowid()
    }

    fn params(token: &str) -> ClaimParams<'_> {
        ClaimParams {
            now: 10_000,
            limit: 8,
            lease: Duration::from_secs(30),
            claim_token: token,
            claimed_by: "test",
        }
    }

    /// What a claim racing another daemon would do with a plan made from a stale view:
    /// probe a pause whose probe is already out. The store marks no second probe and puts
    /// the row it took back untouched.
    fn stale_probe(_: &[PauseView]) -> ClaimPlan {
        ClaimPlan {
            hold: false,
            probes: vec![ProbeStep {
                scope: SELLER.into(),
                lift_when_idle: false,
            }],
            claim_rest: false,
        }
    }

    #[tokio::test]
    async fn a_second_probe_of_one_pause_is_never_marked() {
        let (_db, store) = temp_store().await;
        let first = insert(&store, "FIRST").await;
        let second = insert(&store, "SECOND").await;
        sqlx::query("INSERT INTO pauses (queue, scope, until_at, reason, created_at) VALUES ('rebill', ?1, 5000, 'sms', 0)")
            .bind(SELLER)
            .execute(store.pool())
            .await
            .unwrap();
        let probe = store
            .claim::<RebillRow>(&params("a"), stale_probe)
            .await
            .unwrap();
        assert_eq!(probe.rows.len(), 1);
        let probe_id = probe.rows[0].meta.id;

        let late = store
            .claim::<RebillRow>(&params("b"), stale_probe)
            .await
            .unwrap();
        assert!(
            late.rows.is_empty(),
            "a second probe went out: {:?}",
            late.rows
        );
        let other = if probe_id == first { second } else { first };
        let (status, attempts, token, recent): (String, i64, Option<String>, String) = sqlx::query_as(
            "SELECT status, attempts, claim_token, recent_attempts FROM rebill_orders WHERE id = ?1",
        )
        .bind(other)
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!((status.as_str(), attempts, token), ("pending", 0, None));
        assert_eq!(
            recent, "[]",
            "the put-back claim left no attempt time behind"
        );
        let (marked,): (i64,) = sqlx::query_as("SELECT probe_row_id FROM pauses")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(marked, probe_id);
    }

    #[tokio::test]
    async fn a_probe_lifts_only_the_pause_it_belongs_to() {
        let (_db, store) = temp_store().await;
        let row = insert(&store, "PROBE").await;
        let claimed = store
            .claim::<RebillRow>(&params("tok"), |_| ClaimPlan::unpaused())
            .await
            .unwrap();
        assert_eq!(claimed.rows.len(), 1);
        // A pause whose probe is another row (set after this claim, say by an operator).
        sqlx::query("INSERT INTO pauses (queue, scope, until_at, reason, probe_row_id, created_at) VALUES ('rebill', '*', 5000, 'quota', ?1, 0)")
            .bind(row + 1000)
            .execute(store.pool())
            .await
            .unwrap();
        let mut done = accepted(row, "tok", 10_000);
        done.pause = PauseChange::LiftProbed;
        assert_eq!(
            store.complete(QueueName::Rebill, &[done]).await.unwrap(),
            [true]
        );
        assert_eq!(
            store.pauses().await.unwrap().len(),
            1,
            "another probe's pause was lifted"
        );
    }
}
