//! Housekeeping on a database several daemons share: one run per scheduled time across
//! all of them, and pruning in short batches that never wait on a row another daemon holds.

use sqlx::{Postgres, Transaction};

use super::{ClockBoundary, PgStore};
use crate::store::{QueueName, StoreError};

/// The advisory lock key of housekeeping (any constant; "invoice-worker housekeeping").
const HOUSEKEEPING_LOCK: i64 = 0x01AF_01CE_0000_0001;

/// The right to make one scheduled housekeeping run. While it is held no other daemon
/// makes a run (an advisory lock of its transaction); dropping it ends the run, and a run
/// that never finished (its daemon died) leaves its slot free for the next schedule.
pub struct HousekeepingTurn {
    tx: Transaction<'static, Postgres>,
}

impl HousekeepingTurn {
    /// Marks the run made: no daemon makes another for the same scheduled time.
    pub async fn finish(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl PgStore {
    /// Takes the run scheduled at `slot` (epoch ms, the schedule's own time) for
    /// `instance`: `None` when another daemon is running housekeeping now, or has made the
    /// run of this slot (or a later one) already.
    pub async fn housekeeping_turn(
        &self,
        slot: i64,
        instance: &str,
    ) -> Result<Option<HousekeepingTurn>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (locked,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_xact_lock($1)")
            .bind(HOUSEKEEPING_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            tx.rollback().await?;
            return Ok(None);
        }
        let taken: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO housekeeping_runs (name, slot, taken_by, taken_at) \
             VALUES ('housekeeping', $1, $2, invoice_worker_now_ms()) \
             ON CONFLICT (name) DO UPDATE SET slot = excluded.slot, taken_by = excluded.taken_by, \
               taken_at = excluded.taken_at \
             WHERE housekeeping_runs.slot < excluded.slot RETURNING slot",
        )
        .bind(slot)
        .bind(instance)
        .fetch_optional(&mut *tx)
        .await?;
        if taken.is_none() {
            // Ended here, not when the dropped transaction's connection is next used:
            // until then its lock would make this daemon's own next look find it taken.
            tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(HousekeepingTurn { tx }))
    }

    /// Deletes up to `batch` rows of `queue` in one of `statuses` that finished before
    /// `finished_before` (the caller's clock). Rows locked by another daemon are skipped,
    /// not waited for. Returns how many were deleted; call again until it is 0.
    pub async fn prune_batch(
        &self,
        queue: QueueName,
        statuses: &[&str],
        finished_before: i64,
        batch: u32,
        now: i64,
    ) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let clock = ClockBoundary::read(&mut conn, now).await?;
        let statuses: Vec<&str> = statuses.to_vec();
        let done = sqlx::query(&format!(
            "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE status = ANY($1) AND finished_at < $2 \
             LIMIT $3 FOR UPDATE SKIP LOCKED)",
            t = queue.table()
        ))
        .bind(&statuses)
        .bind(clock.inbound(finished_before))
        .bind(batch as i64)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::cluster;

    #[tokio::test]
    async fn of_several_daemons_one_makes_each_scheduled_run() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let a = cluster.scratch_store().await.expect("store");
        // A second daemon: its own pool on the same database.
        let (database,): (String,) = sqlx::query_as("SELECT current_database()")
            .fetch_one(a.pool())
            .await
            .expect("name");
        let b = PgStore::connect(&super::super::PgConnect::new(cluster.url(&database)))
            .await
            .expect("second store");

        let turn = a
            .housekeeping_turn(1_000, "a")
            .await
            .unwrap()
            .expect("a's run");
        assert!(
            b.housekeeping_turn(1_000, "b").await.unwrap().is_none(),
            "while a runs"
        );
        assert!(
            b.housekeeping_turn(2_000, "b").await.unwrap().is_none(),
            "not even the next slot's"
        );
        turn.finish().await.unwrap();
        assert!(
            b.housekeeping_turn(1_000, "b").await.unwrap().is_none(),
            "a made that run"
        );

        // A run that never finished (its daemon died: its connections end) frees the slot.
        let dropped = b
            .housekeeping_turn(2_000, "b")
            .await
            .unwrap()
            .expect("b's run");
        drop(dropped);
        b.close().await;
        // The server ends the dead daemon's session (and its lock) a moment after its
        // connections close: look again until then.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let again = loop {
            if let Some(turn) = a.housekeeping_turn(2_000, "a").await.unwrap() {
                break turn;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the slot stayed taken"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        again.finish().await.unwrap();
        let (by,): (String,) = sqlx::query_as("SELECT taken_by FROM housekeeping_runs")
            .fetch_one(a.pool())
            .await
            .unwrap();
        assert_eq!(by, "a");
        a.close().await;
    }
}
