//! The rescuer (River's job rescuer): returns rows whose lease expired — their daemon died
//! or froze — to `pending`, or to `failed` when that attempt was their last, and rejects
//! rows that can never fall due. Every daemon on the database runs one; the statements only
//! touch rows still `running` with an expired lease, so rescuers never fight.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
}
