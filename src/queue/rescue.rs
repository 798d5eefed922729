//! The rescuer (River's job rescuer): returns rows whose lease expired — their daemon died
//! or froze — to `pending`, or to `failed` when that attempt was their last, and rejects
//! rows that can never fall due. Every daemon on the database runs one; the statements only
//! touch rows still `running` with an expired lease, so rescuers never fight.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::leases::{self, HeldRows};
use super::maintenance_failed;
use crate::clock::Clock;
use crate::store::driver::QueueStore as _;
use crate::store::driver::RescueParams;
use crate::store::{Database, QueueName};

/// Settings of one queue's rescuer.
#[derive(Debug, Clone)]
pub struct RescueSettings {
    /// How often to look (a third of the lease, like the renewal).
    pub every: Duration,
    /// The attempt limit of rows that set none.
    pub max_attempts: u32,
    /// This daemon's own rows, renewed before each rescue.
    pub own: Option<OwnLeases>,
}

/// The rows this daemon's worker holds, and how to renew them. A lease of its own can run
/// out while the daemon is alive: the database was away longer than the lease, and the
/// results of calls made meanwhile are still waiting to be written. Renewing them before a
/// rescue keeps its own rescuer from handing them to another attempt, which would send them
/// again; what another daemon rescued first is found lost by that renewal.
#[derive(Debug, Clone)]
pub struct OwnLeases {
    /// The worker's held rows.
    pub held: HeldRows,
    /// The lease length.
    pub lease: Duration,
    /// The worker's clock.
    pub clock: Clock,
}

/// Rescues `queue`'s expired rows every `settings.every` until `stop`.
pub async fn run(
    store: Database,
    queue: QueueName,
    settings: RescueSettings,
    clock: Clock,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(settings.every) => {}
            _ = stop.cancelled() => return,
        }
        rescue_once(&store, queue, &settings, clock.now_ms()).await;
    }
}

/// One round at time `now`: unschedulable rows first, then expired leases; nothing but one
/// read when there is neither.
pub async fn rescue_once(store: &Database, queue: QueueName, settings: &RescueSettings, now: i64) {
    match store.rescue_needed(queue, now).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => return maintenance_failed(queue, "looking for rows to rescue", &e),
    }
    if let Some(own) = &settings.own {
        if !own.held.alive().is_empty() {
            leases::renew_once(store, queue, own.lease, &own.clock, &own.held).await;
        }
    }
    match store.reject_unschedulable(queue, now).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            queue = queue.as_str(),
            rejected = n,
            "rows whose next_attempt_at is not an integer rejected (they could never fall due)"
        ),
        Err(e) => maintenance_failed(queue, "checking for unschedulable rows", &e),
    }
    match store
        .rescue_expired(RescueParams {
            queue,
            now,
            default_max_attempts: settings.max_attempts,
        })
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            queue = queue.as_str(),
            rescued = n,
            "rows whose lease expired (their daemon died) are claimable again"
        ),
        Err(e) => maintenance_failed(queue, "lease rescue", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    /// Expiry is judged by the time passed in, so the test moves time instead of sleeping.
    #[tokio::test]
    async fn only_expired_leases_are_rescued_and_a_last_attempt_fails() {
        let (_db, store) = temp_store().await;
        let now = 5_000_000;
        for (orderno, lease, attempts) in [
            ("EXPIRED", now - 1, 1),
            ("LAST", now - 1, 3),
            ("LIVE", now + 10_000, 1),
        ] {
            sqlx::query(
                "INSERT INTO rebill_orders (orderno, tax_num, status, attempts, claim_token, lease_expires_at) \
                 VALUES (?1, 'T', 'running', ?2, 'tok', ?3)",
            )
            .bind(orderno)
            .bind(attempts)
            .bind(lease)
            .execute(store.pool())
            .await
            .unwrap();
        }
        let settings = RescueSettings {
            every: Duration::from_secs(1),
            max_attempts: 3,
            own: None,
        };
        assert!(
            !store
                .rescue_needed(QueueName::Rebill, now - 2)
                .await
                .unwrap(),
            "no lease has expired yet"
        );
        assert!(store.rescue_needed(QueueName::Rebill, now).await.unwrap());
        rescue_once(&store.clone().into(), QueueName::Rebill, &settings, now).await;
        assert!(!store.rescue_needed(QueueName::Rebill, now).await.unwrap());
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT orderno, status, claim_token FROM rebill_orders ORDER BY orderno",
        )
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(
            rows,
            [
                ("EXPIRED".into(), "pending".into(), None),
                ("LAST".into(), "failed".into(), None),
                ("LIVE".into(), "running".into(), Some("tok".into())),
            ]
        );
    }

    /// A literal statement on either backend (test setup).
    async fn exec(store: &Database, sql: &str) {
        match store {
            Database::Sqlite(s) => sqlx::query(sql).execute(s.pool()).await.map(|_| ()),
            Database::Postgres(s) => sqlx::query(sql).execute(s.pool()).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Rows of a literal query on either backend.
    async fn rows<T>(store: &Database, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        match store {
            Database::Sqlite(s) => sqlx::query_as(sql).fetch_all(s.pool()).await,
            Database::Postgres(s) => sqlx::query_as(sql).fetch_all(s.pool()).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    crate::store::on_both_databases!(rows_this_daemon_still_holds_are_renewed_not_rescued);

    /// A daemon's rescuer first renews the leases of rows it still holds (their results
    /// are on their way to the database), then rescues only the rows of dead holders.
    async fn rows_this_daemon_still_holds_are_renewed_not_rescued(store: Database) {
        let now = crate::store::now_ms();
        for orderno in ["MINE", "DEAD-PEERS"] {
            exec(
                &store,
                &format!(
                    "INSERT INTO rebill_orders (orderno, tax_num, status, attempts, claim_token, lease_expires_at) \
                     VALUES ('{orderno}', 'T', 'running', 1, '{orderno}', {})",
                    now - 1
                ),
            )
            .await;
        }
        let (mine,): (i64,) = rows(
            &store,
            "SELECT id FROM rebill_orders WHERE orderno = 'MINE'",
        )
        .await
        .pop()
        .expect("MINE");
        let held = HeldRows::default();
        held.hold(mine, "MINE");
        let settings = RescueSettings {
            every: Duration::from_secs(1),
            max_attempts: 3,
            own: Some(OwnLeases {
                held: held.clone(),
                lease: Duration::from_secs(30),
                clock: Clock::system(),
            }),
        };
        rescue_once(&store, QueueName::Rebill, &settings, now).await;
        let rows: Vec<(String, String, i64)> = rows(
            &store,
            "SELECT orderno, status, COALESCE(lease_expires_at, 0) FROM rebill_orders ORDER BY orderno",
        )
        .await;
        assert_eq!(
            (rows[0].0.as_str(), rows[0].1.as_str()),
            ("DEAD-PEERS", "pending")
        );
        assert_eq!(
            (rows[1].0.as_str(), rows[1].1.as_str()),
            ("MINE", "running")
        );
        assert!(rows[1].2 >= now + 29_000, "renewed: {rows:?}");
        assert!(!held.is_lost(mine));
    }
}
