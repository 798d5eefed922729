//! A daemon frozen (SIGSTOP) past its lease sends none of the rows another daemon took over.

use super::*;

on_both_backends!(a_frozen_daemon_that_wakes_up_sends_no_row_it_lost);

/// Whether the frozen daemon holds no write lock: SQLite's write lock is free, or no
/// connection on the PostgreSQL database is inside a transaction (whose row locks the
/// other daemon's rescue would skip).
async fn holds_no_lock(world: &World) -> bool {
    use sqlx::{ConnectOptions, Connection};
    if world.database.as_sqlite().is_none() {
        return world
            .count(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
                 AND xact_start IS NOT NULL",
            )
            .await
            == 0;
    }
    let mut probe = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&world.config.database.path)
        .busy_timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("probe connection");
    let free = sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut probe)
        .await
        .is_ok();
    if free {
        sqlx::query("ROLLBACK")
            .execute(&mut probe)
            .await
            .expect("rollback");
    }
    probe.close().await.expect("close probe");
    free
}

/// Stops `daemon` (SIGSTOP) at a moment it holds no write lock: a process frozen inside a
/// write transaction blocks the rows (PostgreSQL) or the whole file (SQLite) until it
/// resumes or the systemd watchdog kills it, which is the database's locking, not what this
/// test is about.
async fn freeze_outside_a_write(daemon: &Daemon, world: &World) {
    for _ in 0..50 {
        daemon.signal(Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if holds_no_lock(world).await {
            return;
        }
        daemon.signal(Signal::SIGCONT);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("the daemon always held a write lock when frozen");
}

/// A daemon frozen (SIGSTOP) past its lease while rows it claimed wait for the rate limit,
/// then thawed (SIGCONT) after another daemon took those rows over, sends none of them:
/// it checks its lease right before sending.
async fn a_frozen_daemon_that_wakes_up_sends_no_row_it_lost(backend: Backend) {
    const ROWS: usize = 6;
    let Some(world) = World::on(backend).await else {
        return;
    };
    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("FROZEN-{i}")).collect();
    insert_many(&world, &ordernos, TAX).await;
    let lease = ("lease = \"3000ms\"", "lease = \"1s\"");
    // A sends one row a second, so the rows it claimed wait for their turn.
    let slow = write_toml(
        &world,
        "slow.toml",
        &[
            lease,
            (
                "rate_per_second = 1000\nmax_in_flight",
                "rate_per_second = 1\nmax_in_flight",
            ),
        ],
        "",
    );
    let normal = write_toml(&world, "normal.toml", &[lease], "");
    let mut frozen = start_daemon(&world, &slow, "frozen.log");
    frozen.wait_running().await;
    wait_until(Duration::from_secs(10), "the first row done", || async {
        rebill_count(&world, "done").await >= 1
    })
    .await;
    freeze_outside_a_write(&frozen, &world).await;
    let sent_before = world.sim.rebill_requests().len();
    // Past the lease, another daemon rescues the rows and sends them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut other = start_daemon(&world, &normal, "other.log");
    wait_done(&world, ROWS, 30, "the other daemon finished every row").await;
    other.stop(Duration::from_secs(10), "other daemon");
    // The frozen one wakes up with rows it still believes it holds.
    frozen.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = frozen.stop(Duration::from_secs(10), "thawed daemon");
    let mut sends: HashMap<String, usize> = HashMap::new();
    for r in world.sim.rebill_requests() {
        *sends.entry(r.orderno).or_default() += 1;
    }
    let twice: Vec<_> = sends.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "rows sent twice after the thaw: {twice:?} ({sent_before} sent before the freeze); log:\n{log}"
    );
    assert_eq!(sends.len(), ROWS);
    assert!(
        log.contains("row not sent"),
        "the thawed daemon says why it skipped rows:\n{log}"
    );
}
