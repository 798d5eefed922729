//! Two daemons on one database file: no row sent twice, leases kept across long calls,
//! a killed peer's rows taken over.

use super::*;

on_both_backends!(
    two_daemons_on_one_database_never_send_a_row_twice,
    two_daemons_keep_leases_of_calls_longer_than_the_lease,
    surviving_daemon_resends_the_rows_of_a_killed_peer,
);

async fn two_daemons_on_one_database_never_send_a_row_twice(backend: Backend) {
    const ROWS: usize = 500;
    let Some(world) = world_on(backend, Duration::from_millis(5)).await else {
        return;
    };
    let config = world.write_config();
    let (mut a, mut b) = start_pair(&world, &config, "daemon").await;

    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("TWO-{i:04}")).collect();
    let started = Instant::now();
    insert_many(&world, &ordernos, TAX).await;
    wait_done(&world, ROWS, 30, "all rows done by the two daemons").await;
    let drained = started.elapsed();

    let la = a.stop(Duration::from_secs(10), "daemon A");
    let lb = b.stop(Duration::from_secs(10), "daemon B");
    assert_each_sent_once(&world, ROWS).await;
    assert_eq!(
        world.sim.rebill_requests().len(),
        ROWS,
        "requests beyond one per row"
    );
    for (name, log) in [("A", &la), ("B", &lb)] {
        let busy = busy_lines(log);
        assert!(
            busy.is_empty(),
            "daemon {name} saw lock contention errors: {busy:#?}"
        );
        assert!(
            !log.contains("claim failed"),
            "daemon {name} had failing claims:\n{log}"
        );
    }
    let attempts_a = la.lines().filter(|l| l.contains("orderno=TWO-")).count();
    let attempts_b = lb.lines().filter(|l| l.contains("orderno=TWO-")).count();
    assert_eq!(
        attempts_a + attempts_b,
        ROWS,
        "attempt lines in the two logs"
    );
    assert!(
        attempts_a > 0 && attempts_b > 0,
        "one daemon did all the work ({attempts_a}/{attempts_b}); no contention was tested"
    );
    eprintln!("two daemons ({backend:?}): {ROWS} rows drained in {drained:?}, split {attempts_a}/{attempts_b}, 0 overlapping sends");
}

/// Running rows whose claim names this process (instance = `host:pid:random`).
async fn running_claimed_by_pid(world: &World, pid: u32) -> i64 {
    let counts: Vec<(i64,)> = world
        .writer
        .rows(
            "SELECT COUNT(*) FROM rebill_orders WHERE status = 'running' AND claimed_by LIKE $1",
            &[Arg::Text(format!("%:{pid}:%"))],
        )
        .await;
    counts[0].0
}

async fn two_daemons_keep_leases_of_calls_longer_than_the_lease(backend: Backend) {
    const ROWS: usize = 6;
    let Some(world) = World::on(backend).await else {
        return;
    };
    // Calls of 2.5 s under a 1 s lease: only renewal keeps the other daemon off these rows.
    let config = write_toml(
        &world,
        "long-calls.toml",
        &[
            ("lease = \"3000ms\"", "lease = \"1s\""),
            ("timeout = \"2000ms\"", "timeout = \"10s\""),
        ],
        "",
    );
    let (mut a, mut b) = start_pair(&world, &config, "long").await;
    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("LONG-{i}")).collect();
    script_delay(&world, &ordernos, Duration::from_millis(2500));
    insert_many(&world, &ordernos, TAX).await;
    wait_done(&world, ROWS, 20, "long calls done").await;
    let la = a.stop(Duration::from_secs(10), "daemon A");
    let lb = b.stop(Duration::from_secs(10), "daemon B");
    assert_each_sent_once(&world, ROWS).await;
    for log in [la, lb] {
        assert!(
            !log.contains("lease expired"),
            "a live daemon's lease was treated as expired:\n{log}"
        );
    }
}

async fn surviving_daemon_resends_the_rows_of_a_killed_peer(backend: Backend) {
    const ROWS: usize = 300;
    let Some(world) = world_on(backend, Duration::from_millis(30)).await else {
        return;
    };
    let config = write_toml(
        &world,
        "peer.toml",
        &[("lease = \"3000ms\"", "lease = \"1s\"")],
        "",
    );
    let (mut a, mut b) = start_pair(&world, &config, "peer").await;
    // Every fifth row is slow, so a daemon always holds some rows in flight.
    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("PEER-{i:04}")).collect();
    script_delay(
        &world,
        ordernos.iter().step_by(5),
        Duration::from_millis(800),
    );
    insert_many(&world, &ordernos, TAX).await;
    let w = &world;
    let pid_a = a.child.id();
    wait_until(
        Duration::from_secs(20),
        "a fifth of the rows done and A holding rows",
        move || async move {
            rebill_count(w, "done").await >= (ROWS / 5) as i64
                && running_claimed_by_pid(w, pid_a).await >= 3
        },
    )
    .await;
    let killed = Instant::now();
    a.kill_9("daemon A");
    let orphaned = running_claimed_by_pid(&world, pid_a).await;
    let holders: Vec<(Option<String>, i64)> = world
        .writer
        .rows(
            "SELECT claimed_by, COUNT(*) FROM rebill_orders WHERE status = 'running' GROUP BY 1",
            &[],
        )
        .await;
    let done_at_kill = rebill_count(&world, "done").await;
    wait_done(&world, ROWS, 30, "the survivor finished every row").await;
    let recovered = killed.elapsed();
    let lb = b.stop(Duration::from_secs(10), "daemon B");
    assert!(
        orphaned > 0,
        "A (pid {pid_a}) held no rows when killed ({done_at_kill} done; running rows by holder: {holders:?}); log A:\n{}",
        a.log_text()
    );
    assert!(
        lb.contains("lease expired"),
        "the survivor never reported rescuing rows:\n{lb}"
    );
    assert_all_accepted(&world, ROWS, &["Accepted", "Delay"]).await;
    assert!(
        recovered < Duration::from_secs(60),
        "peer's rows took {recovered:?} to be resent (SPEC: within 60 s)"
    );
    eprintln!("killed peer ({backend:?}): {orphaned} rows orphaned; the survivor finished all {ROWS} rows {recovered:?} after the kill (lease 1s)");
}
