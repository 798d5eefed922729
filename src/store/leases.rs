//! Leases: renewal of held rows, the rescue of rows whose lease expired, the release of
//! unfinished rows at shutdown, and rows that can never fall due.

use super::{QueueName, Store, StoreError};

impl Store {
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
        self.update_held(None, &self.sql(queue).renew, held, lease_until)
            .await
    }

    /// Whether [`Store::rescue_expired`] or [`Store::reject_unschedulable`] has anything to
    /// do at `now`: one indexed read, so that an idle daemon's rescuer takes no write lock.
    pub async fn rescue_needed(&self, queue: QueueName, now: i64) -> Result<bool, StoreError> {
        let (needed,): (bool,) = sqlx::query_as(&self.sql(queue).rescue_needed)
            .bind(now)
            .fetch_one(self.pool())
            .await?;
        Ok(needed)
    }

    /// Returns rows whose lease expired (their daemon died) to `pending`, or to `failed`
    /// when that attempt was their last. Only rows still `running` with an expired lease
    /// are touched, so a row that just completed is never rescued. Returns how many were.
    pub async fn rescue_expired(
        &self,
        queue: QueueName,
        now: i64,
        default_max_attempts: u32,
    ) -> Result<u64, StoreError> {
        let sql = self.sql(queue);
        let (_turn, mut tx) = self.begin_write().await?;
        if self.history_on() {
            sqlx::query(&sql.history_of_rescue)
                .bind(now)
                .bind(default_max_attempts as i64)
                .execute(&mut *tx)
                .await?;
        }
        let done = sqlx::query(&sql.rescue)
            .bind(now)
            .bind(default_max_attempts as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
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
        let sql = self.sql(queue);
        let (_turn, mut tx) = self.begin_write().await?;
        if self.history_on() {
            sqlx::query(&sql.history_of_unschedulable)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        let done = sqlx::query(&sql.reject_unschedulable)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
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
        let sql = self.sql(queue);
        let record = self.history_on().then_some(sql.history_of_release.as_str());
        let changed = self.update_held(record, &sql.release, held, now).await?;
        Ok(changed.into_iter().filter(|c| *c).count() as u64)
    }

    /// When the next pending row of `queue` becomes due (ms), if any is due after `now`.
    /// Rows already due but not claimed are held by a pause, so they are not counted.
    pub async fn next_due_after(
        &self,
        queue: QueueName,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let (at,): (Option<i64>,) = sqlx::query_as(&self.sql(queue).next_due_after)
            .bind(now)
            .fetch_one(self.pool())
            .await?;
        Ok(at)
    }

    /// Runs `sql` (`?1` = `value`, `?2` = id, `?3` = claim token) for every held row in one
    /// write transaction, each after `record` (the history of the change, same parameters)
    /// when given; says, per row, whether it changed.
    async fn update_held(
        &self,
        record: Option<&str>,
        sql: &str,
        held: &[(i64, String)],
        value: i64,
    ) -> Result<Vec<bool>, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let mut changed = Vec::with_capacity(held.len());
        for (id, token) in held {
            if let Some(record) = record {
                sqlx::query(record)
                    .bind(value)
                    .bind(id)
                    .bind(token)
                    .execute(&mut *tx)
                    .await?;
            }
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
}
