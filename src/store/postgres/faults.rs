//! What the PostgreSQL store does when the server goes away under it: a restart
//! (`pg_ctl restart -m fast`), a server that is down for a while, connections the server
//! kills. The answer must be a clear error while it lasts, recovery by itself afterwards,
//! and nothing lost: claims and their tokens live in the database, so a result that comes
//! back after the outage is still applied.

use std::time::Duration;

use super::cluster::{self, ScratchCluster};
use super::{PgConnect, PgStore, PING_IF_IDLE_FOR};
use crate::store::claim::ClaimParams;
use crate::store::pauses::ClaimPlan;
use crate::store::rows::RebillRow;
use crate::store::test_support::accepted;
use crate::store::{now_ms, QueueName};

/// A cluster of this test's own (restarting the shared one would break the others), or
/// `None` where the server binaries are missing (see [`cluster::shared`]).
async fn own_cluster() -> Option<ScratchCluster> {
    cluster::shared()?;
    Some(
        tokio::task::spawn_blocking(ScratchCluster::start)
            .await
            .expect("join")
            .expect("start a cluster of its own"),
    )
}

async fn store_on(cluster: &ScratchCluster) -> PgStore {
    let url = cluster.create_database().await.expect("database");
    let mut connect = PgConnect::new(url);
    connect.connect_timeout = Duration::from_secs(2);
    PgStore::connect_and_migrate(&connect).await.expect("store")
}

async fn insert(store: &PgStore, n: i64) {
    sqlx::query("INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) SELECT 'F-' || g, 'X', 0 FROM generate_series(1, $1) g")
        .bind(n)
        .execute(store.pool())
        .await
        .expect("insert");
}

async fn claim(
    store: &PgStore,
    limit: u32,
    token: &str,
) -> Result<Vec<i64>, crate::store::StoreError> {
    let p = ClaimParams {
        now: now_ms(),
        limit,
        lease: Duration::from_secs(60),
        claim_token: token,
        claimed_by: "faults",
    };
    let batch = store
        .claim::<RebillRow>(&p, |_| ClaimPlan::unpaused())
        .await?;
    Ok(batch.rows.iter().map(|r| r.meta.id).collect())
}

#[tokio::test]
async fn a_restart_mid_drain_loses_nothing_and_needs_no_help() {
    let Some(cluster) = own_cluster().await else {
        return;
    };
    let store = store_on(&cluster).await;
    insert(&store, 10).await;
    let held = claim(&store, 5, "before").await.expect("claim");
    assert_eq!(held.len(), 5);

    let cluster = std::sync::Arc::new(cluster);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .expect("join")
        .expect("restart");

    // The results of the calls in flight during the restart are applied afterwards.
    let done: Vec<_> = held
        .iter()
        .map(|id| accepted(*id, "before", now_ms()))
        .collect();
    let applied = store
        .complete(QueueName::Rebill, &done)
        .await
        .expect("complete after restart");
    assert_eq!(applied, [true; 5]);
    let rest = claim(&store, 10, "after")
        .await
        .expect("claim after restart");
    assert_eq!(rest.len(), 5, "the other rows, each once");
    assert!(rest.iter().all(|id| !held.contains(id)));
    assert!(store.ping().await);
    store.close().await;
}

#[tokio::test]
async fn a_server_that_is_down_is_a_clear_error_until_it_is_back() {
    let Some(cluster) = own_cluster().await else {
        return;
    };
    let store = store_on(&cluster).await;
    insert(&store, 3).await;
    let cluster = std::sync::Arc::new(cluster);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .expect("join")
        .expect("stop");

    assert!(!store.ping().await, "health says the database is gone");
    let err = claim(&store, 3, "down")
        .await
        .expect_err("a claim while the server is down");
    let shown = err.to_string();
    assert!(shown.starts_with("database error"), "{shown}");
    assert!(!shown.contains(cluster::SUPERUSER_PASSWORD), "{shown}");

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start_again())
        .await
        .expect("join")
        .expect("start");
    assert_eq!(
        claim(&store, 3, "up").await.expect("claim once back").len(),
        3
    );
    store.close().await;
}

/// Has the server end every connection of `store`'s database but the caller's.
async fn kill_connections(cluster: &ScratchCluster, store: &PgStore) {
    let admin = PgStore::connect(&PgConnect::new(cluster.url("postgres")))
        .await
        .expect("admin");
    let (database,): (String,) = sqlx::query_as("SELECT current_database()")
        .fetch_one(store.pool())
        .await
        .expect("name");
    let (killed,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()) k",
    )
    .bind(&database)
    .fetch_one(admin.pool())
    .await
    .expect("terminate");
    assert!(killed >= 1, "no connection was killed");
    admin.close().await;
}

/// Connections the server ended while they sat idle in the pool (a restart while the
/// daemon had nothing to do, a middlebox's idle timeout) are replaced before use: the
/// next statement does not fail.
#[tokio::test]
async fn connections_the_server_kills_are_replaced() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let store = cluster.scratch_store().await.expect("store");
    insert(&store, 4).await;
    // Warm the pool, then have the server end every connection of this database.
    assert_eq!(claim(&store, 2, "a").await.expect("claim").len(), 2);
    kill_connections(cluster, &store).await;
    // Idle past the threshold at which a pooled connection is checked before use.
    tokio::time::sleep(PING_IF_IDLE_FOR * 2).await;
    assert_eq!(
        claim(&store, 2, "b")
            .await
            .expect("claim after the kill")
            .len(),
        2
    );
    store.close().await;
}

/// A connection ended right after its last use (not idle long enough to be checked) fails
/// the one statement given to it, a clear error, and is then replaced: the next claim works
/// and nothing was claimed by the failed one.
#[tokio::test]
async fn a_connection_killed_right_after_use_fails_one_statement_then_is_replaced() {
    let Some(cluster) = cluster::shared() else {
        return;
    };
    let store = cluster.scratch_store().await.expect("store");
    insert(&store, 4).await;
    assert_eq!(claim(&store, 2, "a").await.expect("claim").len(), 2);
    let pooled = store.pool().size();
    kill_connections(cluster, &store).await;
    let mut failures = 0;
    let claimed = loop {
        match claim(&store, 2, "b").await {
            Ok(ids) => break ids,
            Err(e) => {
                // At most once per connection the pool held when they were killed.
                failures += 1;
                assert!(failures <= pooled, "the pool did not recover: {e}");
            }
        }
    };
    assert_eq!(
        claimed.len(),
        2,
        "the rows a failed claim touched are still there"
    );
    store.close().await;
}
