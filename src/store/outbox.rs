//! The alert outbox: events written in the same transaction as the state change that
//! raised them, claimed by a deliverer under a lease, finished per target; and the
//! monitors' steps (the failed-rows digest, the stuck-queue watch) that raise an event only
//! where the state they read is still current, so several daemons raise each one once.

use std::time::Duration;

use serde::Serialize;
use sqlx::SqliteConnection;

use super::{QueueName, Store, StoreError};
use crate::alerts::{Event, EventKind, FailedRow, MAX_EXAMPLES};

const INSERT: &str =
    "INSERT INTO alert_outbox (event, body, created_at, next_attempt_at) VALUES (?1, ?2, ?3, ?3)";

/// `?1` token, `?2` now, `?3` lease end, `?4` limit.
const CLAIM: &str = "UPDATE alert_outbox SET claim_token = ?1, attempts = attempts + 1, next_attempt_at = ?3 \
     WHERE id IN (SELECT id FROM alert_outbox INDEXED BY alert_outbox_due \
                  WHERE status = 'pending' AND next_attempt_at <= ?2 ORDER BY next_attempt_at, id LIMIT ?4) \
     RETURNING id, event, body, attempts, delivered_to, created_at";

/// `?1` id, `?2` token, `?3` status, `?4` next attempt, `?5` delivered to, `?6` error, `?7` now.
const FINISH: &str = "UPDATE alert_outbox SET status = ?3, next_attempt_at = ?4, delivered_to = ?5, last_error = ?6, \
     claim_token = NULL, finished_at = CASE WHEN ?3 = 'pending' THEN NULL ELSE ?7 END \
     WHERE id = ?1 AND claim_token = ?2 AND status = 'pending'";

const NEXT_DUE: &str =
    "SELECT MIN(next_attempt_at) FROM alert_outbox INDEXED BY alert_outbox_due WHERE status = 'pending'";

/// `?1` name, `?2` error or NULL, `?3` now.
const RECORD_TARGET: &str = "INSERT INTO alert_targets (name, failing_since, last_error, last_ok_at, updated_at) \
     VALUES (?1, CASE WHEN ?2 IS NULL THEN NULL ELSE ?3 END, ?2, CASE WHEN ?2 IS NULL THEN ?3 END, ?3) \
     ON CONFLICT (name) DO UPDATE SET \
       failing_since = CASE WHEN ?2 IS NULL THEN NULL ELSE COALESCE(failing_since, ?3) END, \
       last_error = COALESCE(?2, last_error), \
       last_ok_at = CASE WHEN ?2 IS NULL THEN ?3 ELSE last_ok_at END, updated_at = ?3";

const STATE_READ: &str = "SELECT value FROM alert_state WHERE key = ?1";
/// `?1` key, `?2` value, `?3` now: first value; never replaces one.
const STATE_INIT: &str =
    "INSERT INTO alert_state (key, value, updated_at) VALUES (?1, ?2, ?3) ON CONFLICT (key) DO NOTHING";
/// `?1` key, `?2` new value, `?3` value read, `?4` now: changes only what was read.
const STATE_SWAP: &str =
    "UPDATE alert_state SET value = ?2, updated_at = ?4 WHERE key = ?1 AND value = ?3";

/// `?1` finished before, `?2` limit.
const PRUNE: &str = "DELETE FROM alert_outbox WHERE id IN (SELECT id FROM alert_outbox \
     WHERE status IN ('delivered', 'given_up') AND finished_at < ?1 LIMIT ?2)";

/// Writes `event` to the outbox inside the caller's transaction.
pub(super) async fn raise(conn: &mut SqliteConnection, event: &Event) -> Result<(), StoreError> {
    let body = serde_json::to_string(event)
        .map_err(|e| StoreError::Constraint(format!("alert event not serialisable: {e}")))?;
    sqlx::query(INSERT)
        .bind(event.event.as_str())
        .bind(body)
        .bind(event.at)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::classify)?;
    Ok(())
}

/// An outbox row claimed for delivery.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedAlert {
    /// Row id.
    pub id: i64,
    /// The event kind's name.
    pub event: String,
    /// The event as JSON.
    pub body: String,
    /// Deliveries tried, this one included.
    pub attempts: i64,
    /// JSON array of the targets that have it already.
    pub delivered_to: String,
    /// When it was raised (ms).
    pub created_at: i64,
}

impl ClaimedAlert {
    /// The targets that have it already (an unreadable list counts as none: a duplicate
    /// message is better than a lost one).
    pub fn delivered(&self) -> Vec<String> {
        serde_json::from_str(&self.delivered_to).unwrap_or_default()
    }
}

/// What became of one delivery round of a claimed alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertDelivery {
    /// Every target that wants it has it.
    Delivered,
    /// Some target still lacks it: try again at `at` (ms).
    Retry {
        /// When.
        at: i64,
        /// The last failure, for `status`.
        error: String,
    },
    /// Tried for too long (or unreadable): stop.
    GiveUp {
        /// Why.
        error: String,
    },
}

impl AlertDelivery {
    /// The outbox row's `status`, next attempt time and last error after this round.
    pub(crate) fn row_values(&self, now: i64) -> (&'static str, i64, Option<&str>) {
        match self {
            AlertDelivery::Delivered => ("delivered", now, None),
            AlertDelivery::Retry { at, error } => ("pending", *at, Some(error.as_str())),
            AlertDelivery::GiveUp { error } => ("given_up", now, Some(error.as_str())),
        }
    }
}

/// The "rows failed" digest of `count` rows since `since`, with the first of them
/// (id, order, seller, message).
pub(crate) fn rows_failed_event(
    queue: QueueName,
    now: i64,
    count: i64,
    since: i64,
    rows: Vec<(i64, String, String, String)>,
) -> Event {
    let mut event = Event::new(EventKind::RowsFailed, queue.as_str(), now);
    event.count = Some(count);
    event.since = Some(since);
    event.rows = rows
        .into_iter()
        .map(|(id, order, seller, message)| FailedRow {
            id,
            order,
            seller,
            message,
        })
        .collect();
    event
}

/// "Queue stuck" since `since` with `due` rows waiting, or (`due` = `None`) "queue
/// recovered" from being stuck since `since`.
pub(crate) fn stuck_event(queue: QueueName, now: i64, since: i64, due: Option<i64>) -> Event {
    let kind = if due.is_some() {
        EventKind::QueueStuck
    } else {
        EventKind::QueueRecovered
    };
    let mut e = Event::new(kind, queue.as_str(), now);
    e.since = Some(since);
    e.count = due;
    e
}

/// How one alert target fared last.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TargetHealth {
    /// The target's name.
    pub name: String,
    /// Since when every post to it failed (ms); `None` while it works.
    pub failing_since: Option<i64>,
    /// Its last failure.
    pub last_error: Option<String>,
    /// Its last success (ms).
    pub last_ok_at: Option<i64>,
}

/// The outbox as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AlertReport {
    /// Alerts not yet delivered to every target.
    pub pending: i64,
    /// When the oldest of them was raised (ms).
    pub oldest_pending_at: Option<i64>,
    /// Alerts given up on.
    pub given_up: i64,
    /// The last error of an undelivered alert.
    pub last_error: Option<String>,
    /// Every target that was posted to.
    pub targets: Vec<TargetHealth>,
}

impl Store {
    /// The same store, writing alert events to the outbox when `on` (some `[[alert]]`
    /// target is configured); without targets nothing is written.
    pub fn with_alerts(mut self, on: bool) -> Store {
        self.alerts = on;
        self
    }

    /// Whether state changes raise alerts.
    pub fn alerts_on(&self) -> bool {
        self.alerts
    }

    /// Writes `event` to the outbox in a transaction of its own (a test message, or an
    /// event raised by no state change of the store).
    pub async fn raise_alert(&self, event: &Event) -> Result<(), StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        raise(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Claims up to `limit` due alerts for `lease` under `token`: until then no other
    /// deliverer takes them, and after it (a deliverer killed mid-post) any may.
    pub async fn claim_alerts(
        &self,
        now: i64,
        lease: Duration,
        token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedAlert>, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let rows = sqlx::query_as(CLAIM)
            .bind(token)
            .bind(now)
            .bind(now + lease.as_millis() as i64)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Records a delivery round: which targets have it now and what is next. False when
    /// the claim was lost (the lease ran out and another deliverer took it).
    pub async fn finish_alert(
        &self,
        id: i64,
        token: &str,
        delivered_to: &[String],
        result: &AlertDelivery,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (status, next, error) = result.row_values(now);
        let delivered = serde_json::to_string(delivered_to).unwrap_or_else(|_| "[]".into());
        let _turn = self.write_turn().await;
        let done = sqlx::query(FINISH)
            .bind(id)
            .bind(token)
            .bind(status)
            .bind(next)
            .bind(delivered)
            .bind(error)
            .bind(now)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// When the next undelivered alert is due (ms).
    pub async fn next_alert_due(&self) -> Result<Option<i64>, StoreError> {
        let (at,): (Option<i64>,) = sqlx::query_as(NEXT_DUE).fetch_one(self.pool()).await?;
        Ok(at)
    }

    /// Remembers how a post to target `name` went (`error` = `None` for success).
    pub async fn record_target(
        &self,
        name: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        sqlx::query(RECORD_TARGET)
            .bind(name)
            .bind(error)
            .bind(now)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The outbox and the targets' health, for `status`.
    pub async fn alert_report(&self) -> Result<AlertReport, StoreError> {
        let (pending, oldest, given_up): (i64, Option<i64>, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE status = 'pending'), \
                    MIN(created_at) FILTER (WHERE status = 'pending'), \
                    COUNT(*) FILTER (WHERE status = 'given_up') \
             FROM alert_outbox WHERE status IN ('pending', 'given_up')",
        )
        .fetch_one(self.pool())
        .await?;
        let (last_error,): (Option<String>,) = sqlx::query_as(
            "SELECT (SELECT last_error FROM alert_outbox WHERE status = 'pending' AND last_error IS NOT NULL \
             ORDER BY id DESC LIMIT 1)",
        )
        .fetch_one(self.pool())
        .await?;
        let targets = sqlx::query_as(
            "SELECT name, failing_since, last_error, last_ok_at FROM alert_targets ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(AlertReport {
            pending,
            oldest_pending_at: oldest,
            given_up,
            last_error,
            targets,
        })
    }

    /// Raises one "rows failed" digest for `queue` when rows failed since the last one and
    /// the last one is at least `every` old. The digest's window end is stored with the
    /// event in one transaction, changed only where it is still the value read: two
    /// daemons never send the same digest. The first call only starts the window (rows that
    /// failed before the daemon ever ran are not news). Reads alone while there is nothing
    /// to raise.
    pub async fn digest_failed(
        &self,
        queue: QueueName,
        now: i64,
        every: Duration,
    ) -> Result<Option<Event>, StoreError> {
        let key = format!("rows_failed:{}", queue.as_str());
        let sql = self.sql(queue);
        let Some(since) = self.state(&key).await? else {
            self.init_state(&key, now, now).await?;
            return Ok(None);
        };
        if now < since + every.as_millis() as i64 {
            return Ok(None);
        }
        let (count,): (i64,) = sqlx::query_as(&sql.failed_between_count)
            .bind(since)
            .bind(now)
            .fetch_one(self.pool())
            .await?;
        if count == 0 {
            return Ok(None);
        }
        let rows: Vec<(i64, String, String, String)> = sqlx::query_as(&sql.failed_between)
            .bind(since)
            .bind(now)
            .bind(MAX_EXAMPLES as i64)
            .fetch_all(self.pool())
            .await?;
        let event = rows_failed_event(queue, now, count, since, rows);
        Ok(self
            .swap_and_raise(&key, since, now, &event)
            .await?
            .then_some(event))
    }

    /// Raises "queue stuck" when the oldest due row of a seller that is not paused has
    /// waited longer than `after`, and "queue recovered" when that ends; each change once
    /// across daemons (as [`Store::digest_failed`]). A queue paused as a whole is not
    /// stuck: its pause was alerted. Reads alone while nothing changes.
    pub async fn watch_stuck(
        &self,
        queue: QueueName,
        now: i64,
        after: Duration,
    ) -> Result<Option<Event>, StoreError> {
        let key = format!("stuck:{}", queue.as_str());
        let sql = self.sql(queue);
        let (oldest,): (Option<i64>,) = sqlx::query_as(&sql.oldest_due_unpaused)
            .bind(now)
            .bind(queue.as_str())
            .fetch_one(self.pool())
            .await?;
        let (queue_paused,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pauses WHERE queue = ?1 AND scope = '*')")
                .bind(queue.as_str())
                .fetch_one(self.pool())
                .await?;
        let stuck_since =
            oldest.filter(|at| !queue_paused && *at <= now - after.as_millis() as i64);
        // The stored value: when the queue was found stuck, 0 while it moves.
        let was = self.state(&key).await?.unwrap_or(0);
        let event = match (was, stuck_since) {
            (0, Some(since)) => {
                let (count,): (i64,) = sqlx::query_as(&sql.due_count)
                    .bind(now)
                    .fetch_one(self.pool())
                    .await?;
                stuck_event(queue, now, since, Some(count))
            }
            (stuck_at, None) if stuck_at != 0 => stuck_event(queue, now, stuck_at, None),
            _ => return Ok(None),
        };
        self.init_state(&key, 0, now).await?;
        let value = if stuck_since.is_some() { now } else { 0 };
        Ok(self
            .swap_and_raise(&key, was, value, &event)
            .await?
            .then_some(event))
    }

    /// The monitor state under `key`.
    async fn state(&self, key: &str) -> Result<Option<i64>, StoreError> {
        let value: Option<(i64,)> = sqlx::query_as(STATE_READ)
            .bind(key)
            .fetch_optional(self.pool())
            .await?;
        Ok(value.map(|(v,)| v))
    }

    /// Stores `value` under `key` unless a value is there already.
    async fn init_state(&self, key: &str, value: i64, now: i64) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        sqlx::query(STATE_INIT)
            .bind(key)
            .bind(value)
            .bind(now)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// In one transaction: changes `key` from `read` to `value` and raises `event`; false
    /// (and nothing written) when another daemon changed `key` first.
    async fn swap_and_raise(
        &self,
        key: &str,
        read: i64,
        value: i64,
        event: &Event,
    ) -> Result<bool, StoreError> {
        let (_turn, mut tx) = self.begin_write().await?;
        let done = sqlx::query(STATE_SWAP)
            .bind(key)
            .bind(value)
            .bind(read)
            .bind(event.at)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        raise(&mut tx, event).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes up to `batch` delivered or given-up alerts finished before `before` (ms).
    pub async fn prune_alerts(&self, before: i64, batch: u32) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await;
        Ok(sqlx::query(PRUNE)
            .bind(before)
            .bind(batch as i64)
            .execute(self.pool())
            .await?
            .rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{insert_due, temp_store};

    const MIN: i64 = 60_000;

    async fn fail_rows(store: &Store, ids: &[i64], at: i64) {
        for id in ids {
            sqlx::query("UPDATE rebill_orders SET status = 'failed', finished_at = ?2, last_message = 'gave up' WHERE id = ?1")
                .bind(id)
                .bind(at)
                .execute(store.pool())
                .await
                .unwrap();
        }
    }

    async fn outbox_events(store: &Store) -> Vec<String> {
        sqlx::query_as::<_, (String,)>("SELECT event FROM alert_outbox ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|(e,)| e)
            .collect()
    }

    #[tokio::test]
    async fn a_digest_is_raised_once_by_two_daemons_and_at_most_once_per_interval() {
        let (db, a) = temp_store().await;
        // A second daemon: its own pool on the same file.
        let b = Store::open(&db.path(), Duration::from_secs(5))
            .await
            .unwrap();
        let every = Duration::from_secs(15 * 60);
        let t0 = 1_000 * MIN;
        // The first look only starts the window: earlier failures are not news.
        let old = insert_due(&a, &["OLD"]).await;
        fail_rows(&a, &old, t0 - MIN).await;
        assert_eq!(
            a.digest_failed(QueueName::Rebill, t0, every).await.unwrap(),
            None
        );
        let ids = insert_due(&a, &["F1", "F2", "F3", "F4", "F5", "F6", "F7"]).await;
        fail_rows(&a, &ids, t0 + MIN).await;
        // Not before the interval has passed since the window began.
        assert_eq!(
            a.digest_failed(QueueName::Rebill, t0 + 2 * MIN, every)
                .await
                .unwrap(),
            None
        );
        let at = t0 + 16 * MIN;
        let (first, second) = tokio::join!(
            a.digest_failed(QueueName::Rebill, at, every),
            b.digest_failed(QueueName::Rebill, at, every)
        );
        let raised: Vec<Event> = [first.unwrap(), second.unwrap()]
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(raised.len(), 1, "{raised:?}");
        let digest = &raised[0];
        assert_eq!((digest.count, digest.since), (Some(7), Some(t0)));
        assert_eq!(digest.rows.len(), MAX_EXAMPLES);
        assert_eq!(digest.rows[0].order, "F1");
        assert_eq!(outbox_events(&a).await, ["rows_failed"]);
        // Nothing new failed: nothing raised, however late.
        assert_eq!(
            a.digest_failed(QueueName::Rebill, at + 60 * MIN, every)
                .await
                .unwrap(),
            None
        );
        b.close().await;
    }

    #[tokio::test]
    async fn stuck_and_recovered_are_raised_once_each_and_paused_sellers_do_not_count() {
        let (_db, store) = temp_store().await;
        let after = Duration::from_secs(3600);
        let now = 10_000 * MIN;
        insert_due(&store, &["WAITING"]).await; // due since the epoch, seller T
        sqlx::query("INSERT INTO pauses (queue, scope, until_at, reason, created_at) VALUES ('rebill', 'T', ?1, 'sms', ?1)")
            .bind(now + MIN)
            .execute(store.pool())
            .await
            .unwrap();
        assert_eq!(
            store
                .watch_stuck(QueueName::Rebill, now, after)
                .await
                .unwrap(),
            None,
            "its seller is paused"
        );
        assert!(store.resume(QueueName::Rebill, "T").await.unwrap());
        let stuck = store
            .watch_stuck(QueueName::Rebill, now, after)
            .await
            .unwrap()
            .expect("stuck");
        assert_eq!(
            (stuck.event, stuck.count, stuck.since),
            (EventKind::QueueStuck, Some(1), Some(0))
        );
        assert_eq!(
            store
                .watch_stuck(QueueName::Rebill, now + MIN, after)
                .await
                .unwrap(),
            None,
            "once"
        );
        sqlx::query("UPDATE rebill_orders SET status = 'done'")
            .execute(store.pool())
            .await
            .unwrap();
        let moving = store
            .watch_stuck(QueueName::Rebill, now + 2 * MIN, after)
            .await
            .unwrap()
            .expect("recovered");
        assert_eq!(
            (moving.event, moving.since),
            (EventKind::QueueRecovered, Some(now))
        );
        assert_eq!(
            store
                .watch_stuck(QueueName::Rebill, now + 3 * MIN, after)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            outbox_events(&store).await,
            ["queue_stuck", "queue_recovered"]
        );
    }

    #[tokio::test]
    async fn a_claimed_alert_is_hidden_for_its_lease_and_only_its_claimer_finishes_it() {
        let (_db, store) = temp_store().await;
        store
            .raise_alert(&Event::new(EventKind::Test, "", 1000))
            .await
            .unwrap();
        let lease = Duration::from_secs(60);
        let mine = store.claim_alerts(1000, lease, "a", 10).await.unwrap();
        assert_eq!(mine.len(), 1);
        assert!(store
            .claim_alerts(2000, lease, "b", 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(store.next_alert_due().await.unwrap(), Some(61_000));
        // Deliverer a died: after the lease, b takes it, and a's late answer is refused.
        let theirs = store.claim_alerts(61_000, lease, "b", 10).await.unwrap();
        assert_eq!((theirs.len(), theirs[0].attempts), (1, 2));
        let names = ["ops".to_string()];
        assert!(!store
            .finish_alert(mine[0].id, "a", &names, &AlertDelivery::Delivered, 62_000)
            .await
            .unwrap());
        let retry = AlertDelivery::Retry {
            at: 70_000,
            error: "ops: HTTP 502".into(),
        };
        assert!(store
            .finish_alert(theirs[0].id, "b", &names, &retry, 62_000)
            .await
            .unwrap());
        let again = store.claim_alerts(70_000, lease, "c", 10).await.unwrap();
        assert_eq!(again[0].delivered(), names);
        let report = store.alert_report().await.unwrap();
        assert_eq!(
            (report.pending, report.last_error.as_deref()),
            (1, Some("ops: HTTP 502"))
        );
        assert!(store
            .finish_alert(again[0].id, "c", &names, &AlertDelivery::Delivered, 71_000)
            .await
            .unwrap());
        assert_eq!(store.next_alert_due().await.unwrap(), None);
        assert_eq!(store.prune_alerts(71_001, 10).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn pauses_raise_alerts_only_when_alerts_are_on() {
        let (_db, store) = temp_store().await;
        sqlx::query("INSERT INTO pauses (queue, scope, until_at, reason, created_at) VALUES ('rebill', 'T', 1, 'sms', 1)")
            .execute(store.pool())
            .await
            .unwrap();
        assert!(store.resume(QueueName::Rebill, "T").await.unwrap());
        assert!(outbox_events(&store).await.is_empty());
        sqlx::query("INSERT INTO pauses (queue, scope, until_at, reason, created_at) VALUES ('rebill', 'T', 1, 'sms', 1)")
            .execute(store.pool())
            .await
            .unwrap();
        let alerting = store.clone().with_alerts(true);
        assert!(alerting.resume(QueueName::Rebill, "T").await.unwrap());
        assert!(!alerting.resume(QueueName::Rebill, "T").await.unwrap());
        assert_eq!(outbox_events(&store).await, ["pause_lifted"]);
    }
}
