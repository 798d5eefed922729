//! The queue's operations on PostgreSQL: inserts, claims under pauses, batched
//! completions, leases. Each transaction reads the database's clock once
//! ([`ClockBoundary`]); the caller's times are moved across it.

use sqlx::{PgConnection, Row};

use super::sql::QueueSql;
use super::{ClockBoundary, PgStore};
use crate::store::admin::{Enqueued, NewRebill, NewTitle};
use crate::store::claim::{ClaimBatch, ClaimParams};
use crate::store::complete::Completion;
use crate::store::pauses::{self, ClaimPlan, PauseChange, PauseRecord, PauseView, WHOLE_QUEUE};
use crate::store::rows::{decode_claimed, unreadable_reason, Claimed, QueueRow};
use crate::store::{QueueName, StoreError};

impl StoreError {
    /// Sorts PostgreSQL's constraint violations from other failures.
    pub(crate) fn classify_pg(error: sqlx::Error) -> StoreError {
        if let sqlx::Error::Database(db) = &error {
            // 23xxx: integrity constraint violations (CHECK, UNIQUE, NOT NULL).
            if db.code().is_some_and(|c| c.starts_with("23")) {
                return StoreError::Constraint(db.message().to_string());
            }
        }
        StoreError::Sqlx(error)
    }
}

/// One row of the claim's first look: the database's now, whether a row is due, and one
/// pause (scope, end, probe in flight), or NULLs when there is none.
type ClaimLook = (i64, bool, Option<String>, Option<i64>, Option<bool>);

impl PgStore {
    /// Inserts a rebilling job unless an active row for the same order exists (`ON
    /// CONFLICT DO NOTHING` on the partial unique index). `not_before` is in the caller's
    /// clock.
    pub async fn enqueue_rebill(&self, job: &NewRebill, now: i64) -> Result<Enqueued, StoreError> {
        let mut tx = self.pool.begin().await?;
        let clock = ClockBoundary::read(&mut tx, now).await?;
        let id: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO rebill_orders (orderno, tax_num, max_attempts, next_attempt_at) \
             VALUES ($1, $2, $3, COALESCE($4, invoice_worker_now_ms())) \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&job.orderno)
        .bind(&job.tax_num)
        .bind(job.max_attempts.map(i64::from))
        .bind(job.not_before.map(|t| clock.inbound(t)))
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::classify_pg)?;
        tx.commit().await?;
        Ok(id.map_or(Enqueued::AlreadyActive, |(id,)| Enqueued::Inserted(id)))
    }

    /// Inserts a title submission. A serial already in the table is a constraint error.
    pub async fn enqueue_title(&self, t: &NewTitle) -> Result<i64, StoreError> {
        let f = &t.fields;
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO title_submissions (order_no, invoice_type, ttqqlsh, attach, gmf_mc, gmf_nsrsbh, gmf_dz, \
             gmf_dh, gmf_yhzh, gmf_yhmc, remark, by1, by2, sqm, data_type) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING id",
        )
        .bind(&f.order_no)
        .bind(&f.invoice_type)
        .bind(&f.ttqqlsh)
        .bind(&f.attach)
        .bind(&f.gmf_mc)
        .bind(&f.gmf_nsrsbh)
        .bind(&f.gmf_dz)
        .bind(&f.gmf_dh)
        .bind(&f.gmf_yhzh)
        .bind(&f.gmf_yhmc)
        .bind(&f.remark)
        .bind(&f.by1)
        .bind(&f.by2)
        .bind(&t.sqm)
        .bind(t.data_type.map(i64::from))
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::classify_pg)?;
        Ok(id)
    }

    /// Stores a generated serial on a claimed title row before its first send. False when
    /// the claim was lost or the row already has one.
    pub async fn set_title_serial(
        &self,
        id: i64,
        claim_token: &str,
        serial: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE title_submissions SET ttqqlsh = $3, updated_at = invoice_worker_now_ms() \
             WHERE id = $1 AND claim_token = $2 AND status = 'running' AND ttqqlsh IS NULL",
        )
        .bind(id)
        .bind(claim_token)
        .bind(serial)
        .execute(&self.pool)
        .await
        .map_err(StoreError::classify_pg)?;
        Ok(done.rows_affected() == 1)
    }

    /// Claims up to `p.limit` due rows, following the plan the queue's pause policy makes
    /// from the pauses that matter (as the SQLite store does). Rows another daemon is
    /// claiming at the same moment are skipped, not waited for; a probe is claimed only
    /// under its pause row's lock, so one daemon of many sends it.
    pub async fn claim<R: QueueRow>(
        &self,
        p: &ClaimParams<'_>,
        plan: impl FnOnce(&[PauseView]) -> ClaimPlan,
    ) -> Result<ClaimBatch<R>, StoreError> {
        let queue = R::QUEUE;
        let sql = self.sql(queue);
        let mut conn = self.pool.acquire().await?;
        // One statement: the database's now, whether anything is due, the pauses.
        let look: Vec<ClaimLook> = sqlx::query_as(&sql.claim_look)
            .bind(queue.as_str())
            .fetch_all(&mut *conn)
            .await?;
        // The statement always returns a row: none means something is badly wrong.
        let Some(&(database_now, any_due, ..)) = look.first() else {
            return Err(StoreError::Sqlx(sqlx::Error::RowNotFound));
        };
        let clock = ClockBoundary {
            database_now,
            caller_now: p.now,
        };
        let now = database_now;
        if !any_due {
            return Ok(ClaimBatch {
                rows: Vec::new(),
                held_by_pause: false,
            });
        }
        let views: Vec<PauseView> = look
            .into_iter()
            .filter_map(|(_, _, scope, until, probing)| {
                Some(PauseView {
                    scope: scope?,
                    until: clock.outbound(until?),
                    probing: probing?,
                })
            })
            .collect();
        let plan = plan(&views);
        let claim = Claim {
            sql,
            params: p,
            clock,
            history: self.history,
        };
        let mut rows = Vec::new();
        if plan.hold {
            return Ok(ClaimBatch {
                rows,
                held_by_pause: true,
            });
        }
        if plan.probes.is_empty() {
            // The steady state: one statement, atomic by itself, which leaves out the
            // paused sellers on its own. A transaction would add two round trips.
            if plan.claim_rest && p.limit > 0 {
                rows = claim
                    .rows::<R>(&mut conn, &sql.claim, p.limit, queue.as_str())
                    .await?;
            }
            return Ok(ClaimBatch {
                held_by_pause: !plan.claim_rest || rows.is_empty(),
                rows,
            });
        }
        // Probes: locking the pause, claiming its probe and marking it go together.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for step in &plan.probes {
            let locked: Option<(String,)> = sqlx::query_as(&sql.lock_pause)
                .bind(queue.as_str())
                .bind(&step.scope)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            if locked.is_none() {
                // Another daemon's claim holds the pause: it sends the probe.
                continue;
            }
            let (statement, key) = if step.scope == WHOLE_QUEUE {
                (&sql.claim, queue.as_str())
            } else {
                (&sql.claim_seller, step.scope.as_str())
            };
            match claim.rows::<R>(&mut tx, statement, 1, key).await?.pop() {
                Some(row) => {
                    let marked = sqlx::query(&sql.mark_probe)
                        .bind(queue.as_str())
                        .bind(&step.scope)
                        .bind(row.meta.id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                    if marked {
                        rows.push(row);
                    } else {
                        sqlx::query(&sql.unclaim)
                            .bind(row.meta.id)
                            .bind(&row.meta.claim_token)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                None if step.lift_when_idle => {
                    let lifted = sqlx::query(&sql.lift_idle_seller_pause)
                        .bind(queue.as_str())
                        .bind(&step.scope)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        > 0;
                    if lifted && self.alerts {
                        let how = "ended with no row left to send";
                        let event = pauses::lifted_event(queue, &step.scope, how, p.now);
                        raise(&mut tx, &event, clock).await?;
                    }
                }
                None => {}
            }
        }
        let room = p.limit.saturating_sub(rows.len() as u32);
        if plan.claim_rest && room > 0 {
            rows.extend(
                claim
                    .rows::<R>(&mut tx, &sql.claim, room, queue.as_str())
                    .await?,
            );
        }
        tx.commit().await?;
        Ok(ClaimBatch {
            held_by_pause: !plan.claim_rest || rows.is_empty(),
            rows,
        })
    }

    /// Applies a batch of completions, each only while its claim token still matches: one
    /// `unnest` statement for the whole batch. The result says, per item, whether it was
    /// applied (`false` = the claim was lost). The pauses the batch lifts (every success
    /// lifts the pause it probed, if any) go in one more statement, and the pauses it
    /// starts one by one, all in the same transaction.
    pub async fn complete(
        &self,
        queue: QueueName,
        items: &[Completion],
    ) -> Result<Vec<bool>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let sql = self.sql(queue);
        let mut tx = self.pool.begin().await?;
        let clock = ClockBoundary::read(&mut tx, items[0].now).await?;
        let applied = complete_rows(&mut tx, sql, items, clock).await?;
        let completed = || {
            items
                .iter()
                .zip(&applied)
                .filter(|(_, ok)| **ok)
                .map(|(c, _)| c)
        };
        let probes: Vec<&Completion> = completed()
            .filter(|c| matches!(c.pause, PauseChange::LiftProbed))
            .collect();
        self.lift_probed(&mut tx, queue, &probes, clock).await?;
        // After the lifts: a pause this batch starts stands, whatever order its rows
        // finished in (a start clears the probe a lift would match).
        for c in completed() {
            if let PauseChange::Start(pause) = &c.pause {
                if start_pause(&mut tx, queue, pause, clock).await? && self.alerts {
                    raise(&mut tx, &pauses::paused_event(queue, pause, c.now), clock).await?;
                }
            }
        }
        self.record_history(&mut tx, sql, queue, items, &applied, clock)
            .await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Lifts the pauses whose probe is among `probes` (rows that went through), with an
    /// alert for each when alerts are on.
    async fn lift_probed(
        &self,
        tx: &mut PgConnection,
        queue: QueueName,
        probes: &[&Completion],
        clock: ClockBoundary,
    ) -> Result<(), StoreError> {
        if probes.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = probes.iter().map(|c| c.id).collect();
        let lifted: Vec<(String, i64)> = sqlx::query_as(
            "DELETE FROM pauses WHERE queue = $1 AND probe_row_id = ANY($2) \
             RETURNING scope, probe_row_id",
        )
        .bind(queue.as_str())
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        if !self.alerts {
            return Ok(());
        }
        for (scope, id) in lifted {
            let Some(c) = probes.iter().find(|c| c.id == id) else {
                continue;
            };
            let how = format!("row {id} went through");
            raise(tx, &pauses::lifted_event(queue, &scope, &how, c.now), clock).await?;
        }
        Ok(())
    }

    /// Records the applied attempts of `items` and counts every attempt per minute.
    async fn record_history(
        &self,
        tx: &mut PgConnection,
        sql: &QueueSql,
        queue: QueueName,
        items: &[Completion],
        applied: &[bool],
        clock: ClockBoundary,
    ) -> Result<(), StoreError> {
        if self.history {
            let mut h = HistoryColumns::default();
            for (c, a) in items
                .iter()
                .zip(applied)
                .filter(|(_, ok)| **ok)
                .filter_map(|(c, _)| Some((c, c.attempt.as_ref()?)))
            {
                h.row_id.push(c.id);
                h.attempt.push(a.attempt);
                // Each attempt's times are moved by its own completion's now (as the row's
                // are in `complete_rows`).
                let own = clock.for_caller(c.now);
                h.started_at.push(own.inbound(a.started_at));
                h.duration_ms.push(a.duration_ms);
                h.http_status.push(a.http_status);
                h.code.push(c.last_code.clone());
                h.message.push(a.message.clone());
                h.action.push(a.action);
                h.status.push(c.status.as_str());
                h.instance.push(a.instance.to_string());
                h.recorded_at.push(own.inbound(c.now));
            }
            if !h.row_id.is_empty() {
                sqlx::query(&sql.history_of_batch)
                    .bind(h.row_id)
                    .bind(h.attempt)
                    .bind(h.started_at)
                    .bind(h.duration_ms)
                    .bind(h.http_status)
                    .bind(h.code)
                    .bind(h.message)
                    .bind(h.action)
                    .bind(h.status)
                    .bind(h.instance)
                    .bind(h.recorded_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::classify_pg)?;
            }
        }
        let attempts = items.iter().filter(|c| c.attempt.is_some()).count() as i64;
        if attempts > 0 {
            sqlx::query(
                "INSERT INTO attempt_minutes (queue, minute, attempts) VALUES ($1, $2, $3) \
                 ON CONFLICT (queue, minute) DO UPDATE SET attempts = attempt_minutes.attempts + excluded.attempts",
            )
            .bind(queue.as_str())
            .bind(clock.database_now.div_euclid(60_000))
            .bind(attempts)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::classify_pg)?;
        }
        Ok(())
    }

    /// Extends the lease of the rows this daemon still works on to `lease_until` (caller's
    /// clock). Says, per row, whether it was renewed (`false` = the claim was lost).
    pub async fn renew_leases(
        &self,
        queue: QueueName,
        held: &[(i64, String)],
        lease_until: i64,
        now: i64,
    ) -> Result<Vec<bool>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        // One statement, the lease's length added to the database's now inside it: a
        // renewal precedes every send, so a transaction with a clock read of its own would
        // be four round trips per row.
        let (ids, tokens): (Vec<i64>, Vec<String>) = held.iter().cloned().unzip();
        let renewed: Vec<(i64,)> = sqlx::query_as(&self.sql(queue).renew)
            .bind(&ids)
            .bind(&tokens)
            .bind(lease_until - now)
            .fetch_all(&self.pool)
            .await?;
        let renewed: std::collections::HashSet<i64> = renewed.into_iter().map(|(id,)| id).collect();
        Ok(ids.iter().map(|id| renewed.contains(id)).collect())
    }

    /// Returns rows whose lease expired by the database's clock (their daemon died) to
    /// `pending`, or to `failed` when that attempt was their last. Rows another daemon is
    /// completing at this moment are locked, hence skipped. Returns how many were rescued.
    pub async fn rescue_expired(
        &self,
        queue: QueueName,
        default_max_attempts: u32,
    ) -> Result<u64, StoreError> {
        let (rescued,): (i64,) = sqlx::query_as(&self.sql(queue).rescue)
            .bind(self.database_now().await?)
            .bind(default_max_attempts as i64)
            .bind(self.history)
            .fetch_one(&self.pool)
            .await?;
        Ok(rescued as u64)
    }

    /// Puts rows this worker holds back to `pending` without using up their attempt
    /// (graceful shutdown). Rows whose claim was lost meanwhile are left alone.
    pub async fn release(
        &self,
        queue: QueueName,
        held: &[(i64, String)],
    ) -> Result<u64, StoreError> {
        if held.is_empty() {
            return Ok(0);
        }
        let (ids, tokens): (Vec<i64>, Vec<String>) = held.iter().cloned().unzip();
        let (released,): (i64,) = sqlx::query_as(&self.sql(queue).release)
            .bind(self.database_now().await?)
            .bind(&ids)
            .bind(&tokens)
            .bind(self.history)
            .fetch_one(&self.pool)
            .await?;
        Ok(released as u64)
    }

    /// When the next pending row of `queue` becomes due, in the caller's clock (`now`), if
    /// any is due after now.
    pub async fn next_due_after(
        &self,
        queue: QueueName,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        let (at,): (Option<i64>,) = sqlx::query_as(&self.sql(queue).next_due_after)
            .bind(clock.database_now)
            .fetch_one(&mut *conn)
            .await?;
        Ok(at.map(|t| clock.outbound(t)))
    }
}

/// One claim's fixed inputs.
struct Claim<'a> {
    sql: &'a QueueSql,
    params: &'a ClaimParams<'a>,
    clock: ClockBoundary,
    history: bool,
}

impl Claim<'_> {
    /// Runs a claim `statement` for at most `limit` rows; `key` fills `$6`. Rows that
    /// cannot be read are rejected on the spot. Times come back in the caller's clock.
    async fn rows<R: QueueRow>(
        &self,
        conn: &mut PgConnection,
        statement: &str,
        limit: u32,
        key: &str,
    ) -> Result<Vec<Claimed<R>>, StoreError> {
        let p = self.params;
        let now = self.clock.database_now;
        let lease_until = now.saturating_add(p.lease.as_millis() as i64);
        let fetched = sqlx::query(statement)
            .bind(p.claim_token)
            .bind(p.claimed_by)
            .bind(lease_until)
            .bind(now)
            .bind(limit as i64)
            .bind(key)
            .fetch_all(&mut *conn)
            .await?;
        let mut rows = Vec::with_capacity(fetched.len());
        for r in &fetched {
            let id: i64 = r.try_get("id")?;
            match decode_claimed::<_, R>(r) {
                Ok((mut meta, row)) => {
                    let clock = self.clock;
                    meta.recent_attempts =
                        ClockBoundary::shift_times(&meta.recent_attempts, |t| clock.outbound(t));
                    meta.confirm_since = meta.confirm_since.map(|t| clock.outbound(t));
                    rows.push(Claimed { meta, row })
                }
                Err(e) => self.reject_unreadable(conn, id, &e).await?,
            }
        }
        Ok(rows)
    }

    async fn reject_unreadable(
        &self,
        conn: &mut PgConnection,
        id: i64,
        error: &sqlx::Error,
    ) -> Result<(), StoreError> {
        let reason = unreadable_reason(error);
        tracing::warn!(row_id = id, %reason, "row rejected: it cannot be read");
        let now = self.clock.database_now;
        if self.history {
            sqlx::query(&self.sql.history_of_unreadable)
                .bind(id)
                .bind(&reason)
                .bind(now)
                .execute(&mut *conn)
                .await?;
        }
        sqlx::query(&self.sql.reject_unreadable)
            .bind(id)
            .bind(reason)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Applies `items` in one statement; per item, whether its claim still held.
async fn complete_rows(
    conn: &mut PgConnection,
    sql: &QueueSql,
    items: &[Completion],
    clock: ClockBoundary,
) -> Result<Vec<bool>, StoreError> {
    // Each item's times are the same distance from the database's now as from its own.
    let moved = |c: &Completion, t: i64| clock.for_caller(c.now).inbound(t);
    let done: Vec<(i64,)> = sqlx::query_as(&sql.complete_batch)
        .bind(items.iter().map(|c| c.id).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|c| c.claim_token.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(items.iter().map(|c| c.status.as_str()).collect::<Vec<_>>())
        .bind(items.iter().map(|c| c.outcome).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|c| moved(c, c.next_attempt_at))
                .collect::<Vec<_>>(),
        )
        .bind(items.iter().map(|c| c.refund_attempt).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|c| c.last_code.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|c| c.last_message.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|c| c.invoice_no.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|c| c.invoice_down_url.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|c| {
                    c.recent_attempts
                        .as_deref()
                        .map(|r| ClockBoundary::shift_times(r, |t| moved(c, t)))
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|c| c.confirm_since.map(|t| moved(c, t)))
                .collect::<Vec<_>>(),
        )
        .bind(clock.database_now)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::classify_pg)?;
    let done: std::collections::HashSet<i64> = done.into_iter().map(|(id,)| id).collect();
    Ok(items.iter().map(|c| done.contains(&c.id)).collect())
}

/// The history's columns for one batch, as arrays for `unnest`.
#[derive(Default)]
struct HistoryColumns {
    row_id: Vec<i64>,
    attempt: Vec<i64>,
    started_at: Vec<i64>,
    duration_ms: Vec<i64>,
    http_status: Vec<i64>,
    code: Vec<Option<String>>,
    message: Vec<String>,
    action: Vec<&'static str>,
    status: Vec<&'static str>,
    instance: Vec<String>,
    recorded_at: Vec<i64>,
}

/// Starts a pause, or extends one already there (its probe no longer counts). True when
/// it is a new pause.
async fn start_pause(
    conn: &mut PgConnection,
    queue: QueueName,
    pause: &PauseRecord,
    clock: ClockBoundary,
) -> Result<bool, StoreError> {
    // `xmax = 0` only on a freshly inserted row: the upsert says itself whether it was new.
    let (inserted,): (bool,) = sqlx::query_as(
        "INSERT INTO pauses (queue, scope, until_at, reason, probe_row_id, created_at) \
         VALUES ($1, $2, $3, $4, NULL, $5) \
         ON CONFLICT (queue, scope) DO UPDATE SET until_at = GREATEST(pauses.until_at, excluded.until_at), \
         reason = excluded.reason, probe_row_id = NULL RETURNING (xmax = 0)",
    )
    .bind(queue.as_str())
    .bind(&pause.scope)
    .bind(clock.inbound(pause.until))
    .bind(&pause.reason)
    .bind(clock.database_now)
    .fetch_one(&mut *conn)
    .await
    .map_err(StoreError::classify_pg)?;
    Ok(inserted)
}

/// Writes `event` to the outbox inside the caller's transaction.
pub(super) async fn raise(
    conn: &mut PgConnection,
    event: &crate::alerts::Event,
    clock: ClockBoundary,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(event)
        .map_err(|e| StoreError::Constraint(format!("alert event not serialisable: {e}")))?;
    sqlx::query(
        "INSERT INTO alert_outbox (event, body, created_at, next_attempt_at) VALUES ($1, $2, $3, $3)",
    )
    .bind(event.event.as_str())
    .bind(body)
    .bind(clock.inbound(event.at))
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify_pg)?;
    Ok(())
}
