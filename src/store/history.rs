//! The attempt history: one record per attempt of a queue row, written in the transaction
//! that records the attempt's result, and read back by `show` and the console.

use serde::Serialize;
use sqlx::SqliteConnection;

use super::complete::Completion;
use super::{QueueName, Store, StoreError};

/// What the history keeps of one attempt beyond what its completion writes on the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFacts {
    /// Which attempt of the row it was (counted at claim).
    pub attempt: i64,
    /// The daemon instance that made it (`claimed_by`).
    pub instance: std::sync::Arc<str>,
    /// When the call started, epoch ms.
    pub started_at: i64,
    /// How long handling the row took, ms.
    pub duration_ms: i64,
    /// The HTTP status, -1 when no answer arrived.
    pub http_status: i64,
    /// What the daemon did (`done`, `retry`, `rejected`, …).
    pub action: &'static str,
    /// The message as the attempt's log line shows it (escaped, scrubbed).
    pub message: String,
}

/// One recorded attempt, as `show` and the console present it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// Which attempt of the row it was.
    pub attempt: i64,
    /// When it started, epoch ms.
    pub started_at: i64,
    /// How long it took, ms (unknown for a lease that expired).
    pub duration_ms: Option<i64>,
    /// The HTTP status, -1 when no answer arrived.
    pub http_status: i64,
    /// The remote code.
    pub code: Option<String>,
    /// The remote message or the reason.
    pub message: Option<String>,
    /// What the daemon did.
    pub action: String,
    /// The status the attempt left the row in.
    pub status: String,
    /// The daemon instance that made it.
    pub instance: Option<String>,
    /// When it was recorded, epoch ms.
    pub recorded_at: i64,
}

/// The attempts of one queue in one minute (the console's chart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MinuteCount {
    /// The minute, epoch ms / 60 000.
    pub minute: i64,
    /// Attempts recorded in it.
    pub attempts: i64,
}

/// Most history entries `show` and the console read for one row, the newest (a row
/// awaiting confirmation for weeks could pass it).
pub const HISTORY_LIMIT: i64 = 500;

/// Records the attempts of the completions in `items` that were `applied` (a result whose
/// claim was lost is not the row's history), and counts every attempt per minute: two
/// statements at most, in the completion's transaction.
pub(crate) async fn record_batch(
    conn: &mut SqliteConnection,
    store: &Store,
    queue: QueueName,
    items: &[Completion],
    applied: &[bool],
) -> Result<(), StoreError> {
    if store.history_on() {
        let rows: Vec<serde_json::Value> = items
            .iter()
            .zip(applied)
            .filter(|(_, ok)| **ok)
            .filter_map(|(c, _)| {
                let a = c.attempt.as_ref()?;
                Some(serde_json::json!([
                    c.id,
                    a.attempt,
                    a.started_at,
                    a.duration_ms,
                    a.http_status,
                    c.last_code,
                    a.message,
                    a.action,
                    c.status.as_str(),
                    &*a.instance,
                    c.now,
                ]))
            })
            .collect();
        if !rows.is_empty() {
            sqlx::query(&store.sql(queue).history_of_batch)
                .bind(serde_json::Value::Array(rows).to_string())
                .execute(&mut *conn)
                .await
                .map_err(StoreError::classify)?;
        }
    }
    let mut minutes: Vec<(i64, i64)> = Vec::new();
    for c in items.iter().filter(|c| c.attempt.is_some()) {
        let minute = c.now.div_euclid(60_000);
        match minutes.iter_mut().find(|(m, _)| *m == minute) {
            Some((_, n)) => *n += 1,
            None => minutes.push((minute, 1)),
        }
    }
    for (minute, attempts) in minutes {
        sqlx::query(
            "INSERT INTO attempt_minutes (queue, minute, attempts) VALUES (?1, ?2, ?3) \
             ON CONFLICT (queue, minute) DO UPDATE SET attempts = attempts + excluded.attempts",
        )
        .bind(queue.as_str())
        .bind(minute)
        .bind(attempts)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::classify)?;
    }
    Ok(())
}

impl Store {
    /// This store with the attempt history written (`[worker] history`) or not.
    pub fn with_history(mut self, on: bool) -> Store {
        self.history = on;
        self
    }

    /// Whether attempts are recorded in the history.
    pub fn history_on(&self) -> bool {
        self.history
    }

    /// Row `id`'s recorded attempts, oldest first: the newest [`HISTORY_LIMIT`] of them.
    pub async fn attempt_history(
        &self,
        queue: QueueName,
        id: i64,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        type Raw = (
            i64,
            i64,
            Option<i64>,
            i64,
            Option<String>,
            Option<String>,
            String,
            String,
            Option<String>,
            i64,
            i64,
        );
        let rows: Vec<Raw> = sqlx::query_as(
            "SELECT * FROM (SELECT attempt, started_at, duration_ms, http_status, code, message, \
             action, status, instance, recorded_at, id FROM attempt_history \
             WHERE queue = ?1 AND row_id = ?2 ORDER BY id DESC LIMIT ?3) ORDER BY id",
        )
        .bind(queue.as_str())
        .bind(id)
        .bind(HISTORY_LIMIT)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| HistoryEntry {
                attempt: r.0,
                started_at: r.1,
                duration_ms: r.2,
                http_status: r.3,
                code: r.4,
                message: r.5,
                action: r.6,
                status: r.7,
                instance: r.8,
                recorded_at: r.9,
            })
            .collect())
    }

    /// `queue`'s attempts per minute from `since` (epoch ms) on, oldest first.
    pub async fn attempts_per_minute(
        &self,
        queue: QueueName,
        since: i64,
    ) -> Result<Vec<MinuteCount>, StoreError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT minute, attempts FROM attempt_minutes WHERE queue = ?1 AND minute >= ?2 \
             ORDER BY minute",
        )
        .bind(queue.as_str())
        .bind(since.div_euclid(60_000))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(minute, attempts)| MinuteCount { minute, attempts })
            .collect())
    }

    /// Deletes history whose row is gone without its delete trigger firing (`REPLACE`
    /// deletes fire no trigger unless `recursive_triggers` is on); returns how many.
    pub async fn prune_orphaned_history(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for queue in QueueName::ALL {
            let _turn = self.write_turn().await;
            let done = sqlx::query(&format!(
                "DELETE FROM attempt_history WHERE queue = ?1 \
                 AND NOT EXISTS (SELECT 1 FROM {t} r WHERE r.id = attempt_history.row_id)",
                t = queue.table()
            ))
            .bind(queue.as_str())
            .execute(self.pool())
            .await?;
            total += done.rows_affected();
        }
        Ok(total)
    }

    /// Deletes per-minute counts older than `before` (epoch ms); returns how many.
    pub async fn prune_minutes(&self, before: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        let done = sqlx::query("DELETE FROM attempt_minutes WHERE minute < ?1")
            .bind(before.div_euclid(60_000))
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::test_support::{accepted, claim_rebill, insert_due, temp_store};

    fn facts(action: &'static str, message: &str, now: i64) -> AttemptFacts {
        AttemptFacts {
            attempt: 1,
            instance: "test".into(),
            started_at: now - 120,
            duration_ms: 118,
            http_status: 200,
            action,
            message: message.to_string(),
        }
    }

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_batch_records_the_attempts_it_applied_and_counts_every_attempt() {
        let (_db, store) = temp_store().await;
        let ids = insert_due(&store, &["h1", "h2"]).await;
        let now = 1_700_000_000_000;
        claim_rebill(&store, now, 2, LEASE, "tok").await;
        let mut first = accepted(ids[0], "tok", now);
        first.attempt = Some(facts("done", "重试成功", now));
        // A result under a claim token the row no longer carries is not applied, and its
        // attempt is not the row's history either.
        let mut lost = accepted(ids[1], "someone-else", now);
        lost.attempt = Some(facts("done", "lost", now));
        let applied = store
            .complete(QueueName::Rebill, &[first, lost])
            .await
            .expect("complete");
        assert_eq!(applied, vec![true, false]);

        let history = store
            .attempt_history(QueueName::Rebill, ids[0])
            .await
            .expect("history");
        assert_eq!(
            history,
            vec![HistoryEntry {
                attempt: 1,
                started_at: now - 120,
                duration_ms: Some(118),
                http_status: 200,
                code: Some("0".into()),
                message: Some("重试成功".into()),
                action: "done".into(),
                status: "done".into(),
                instance: Some("test".into()),
                recorded_at: now,
            }]
        );
        assert!(store
            .attempt_history(QueueName::Rebill, ids[1])
            .await
            .expect("history")
            .is_empty());
        let minutes = store
            .attempts_per_minute(QueueName::Rebill, now - 3_600_000)
            .await
            .expect("minutes");
        assert_eq!(
            minutes,
            vec![MinuteCount {
                minute: now / 60_000,
                attempts: 2
            }]
        );
    }

    #[tokio::test]
    async fn with_history_off_nothing_is_recorded_but_the_minutes_are_counted() {
        let (_db, store) = temp_store().await;
        let store = store.with_history(false);
        let ids = insert_due(&store, &["off"]).await;
        let now = 1_700_000_000_000;
        claim_rebill(&store, now, 1, LEASE, "tok").await;
        let mut result = accepted(ids[0], "tok", now);
        result.attempt = Some(facts("done", "ok", now));
        store
            .complete(QueueName::Rebill, &[result])
            .await
            .expect("complete");
        assert!(store
            .attempt_history(QueueName::Rebill, ids[0])
            .await
            .expect("history")
            .is_empty());
        let minutes = store
            .attempts_per_minute(QueueName::Rebill, 0)
            .await
            .expect("minutes");
        assert_eq!(minutes.len(), 1);
    }

    #[tokio::test]
    async fn an_expired_lease_and_a_release_are_recorded_with_the_daemon_that_held_the_row() {
        let (_db, store) = temp_store().await;
        let ids = insert_due(&store, &["dies", "released"]).await;
        let now = 1_700_000_000_000;
        claim_rebill(&store, now, 2, LEASE, "tok").await;
        let released = store
            .release(QueueName::Rebill, &[(ids[1], "tok".to_string())], now + 5)
            .await
            .expect("release");
        assert_eq!(released, 1);
        let later = now + LEASE.as_millis() as i64 + 1;
        assert_eq!(
            store
                .rescue_expired(QueueName::Rebill, later, 50)
                .await
                .expect("rescue"),
            1
        );
        let expired = store
            .attempt_history(QueueName::Rebill, ids[0])
            .await
            .expect("history");
        assert_eq!(expired.len(), 1);
        let e = &expired[0];
        assert_eq!(
            (e.action.as_str(), e.status.as_str(), e.attempt),
            ("lease_expired", "pending", 1)
        );
        assert_eq!(
            (e.started_at, e.duration_ms, e.http_status),
            (now, None, -1)
        );
        assert_eq!(e.instance.as_deref(), Some("test"));
        assert!(e
            .message
            .as_deref()
            .unwrap_or("")
            .contains("outcome unknown"));

        let given_back = store
            .attempt_history(QueueName::Rebill, ids[1])
            .await
            .expect("history");
        assert_eq!(given_back.len(), 1);
        assert_eq!(
            (given_back[0].action.as_str(), given_back[0].status.as_str()),
            ("released", "pending")
        );
    }

    #[tokio::test]
    async fn rows_that_cannot_be_read_or_scheduled_are_recorded_as_rejected() {
        let (_db, store) = temp_store().await;
        // Around the CHECKs: a BLOB order number (unreadable) and a text due time.
        sqlx::query("PRAGMA ignore_check_constraints = ON")
            .execute(store.pool())
            .await
            .expect("pragma");
        let mut conn = store.pool().acquire().await.expect("conn");
        sqlx::query("PRAGMA ignore_check_constraints = ON")
            .execute(&mut *conn)
            .await
            .expect("pragma");
        let blob = sqlx::query(
            "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) VALUES (x'00ff', 'T', 0)",
        )
        .execute(&mut *conn)
        .await
        .expect("insert blob")
        .last_insert_rowid();
        let soon = sqlx::query(
            "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) VALUES ('S', 'T', 'soon')",
        )
        .execute(&mut *conn)
        .await
        .expect("insert text due")
        .last_insert_rowid();
        drop(conn);
        let now = 1_700_000_000_000;
        let claimed = claim_rebill(&store, now, 8, LEASE, "tok").await;
        assert!(claimed.rows.is_empty());
        assert_eq!(
            store
                .reject_unschedulable(QueueName::Rebill, now)
                .await
                .expect("reject"),
            1
        );
        for id in [blob, soon] {
            let history = store
                .attempt_history(QueueName::Rebill, id)
                .await
                .expect("history");
            assert_eq!(history.len(), 1, "row {id}");
            assert_eq!(
                (history[0].action.as_str(), history[0].status.as_str()),
                ("rejected", "rejected")
            );
            assert!(!history[0].message.as_deref().unwrap_or("").is_empty());
        }
    }

    #[tokio::test]
    async fn a_deleted_row_takes_its_history_and_old_minutes_are_pruned() {
        let (_db, store) = temp_store().await;
        let ids = insert_due(&store, &["gone", "stays"]).await;
        let now = 1_700_000_000_000;
        claim_rebill(&store, now, 2, LEASE, "tok").await;
        let results: Vec<_> = ids
            .iter()
            .map(|id| {
                let mut r = accepted(*id, "tok", now);
                r.attempt = Some(facts("done", "ok", now));
                r
            })
            .collect();
        store
            .complete(QueueName::Rebill, &results)
            .await
            .expect("complete");
        sqlx::query("DELETE FROM rebill_orders WHERE id = ?1")
            .bind(ids[0])
            .execute(store.pool())
            .await
            .expect("delete");
        let left: Vec<(i64,)> = sqlx::query_as("SELECT row_id FROM attempt_history")
            .fetch_all(store.pool())
            .await
            .expect("read");
        assert_eq!(left, vec![(ids[1],)]);

        // REPLACE under the same id keeps the history with the id (it is that order's
        // row again); history whose row is gone without a trigger is swept.
        sqlx::query(
            "INSERT OR REPLACE INTO rebill_orders (id, orderno, tax_num) VALUES (?1, 'new', 'T')",
        )
        .bind(ids[1])
        .execute(store.pool())
        .await
        .expect("replace");
        assert_eq!(
            store.prune_orphaned_history().await.expect("sweep"),
            0,
            "the id lives on"
        );
        sqlx::query("INSERT INTO attempt_history (queue, row_id, attempt, started_at, action, status, recorded_at) \
                     VALUES ('rebill', 999, 1, 0, 'done', 'done', 0)")
            .execute(store.pool())
            .await
            .expect("orphan");
        assert_eq!(store.prune_orphaned_history().await.expect("sweep"), 1);

        assert_eq!(store.prune_minutes(now).await.expect("prune"), 0);
        assert_eq!(store.prune_minutes(now + 60_000).await.expect("prune"), 1);
    }
}
