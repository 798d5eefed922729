//! kill -9 at random points while draining, restart, repeatedly: nothing lost, nothing
//! marked without the gateway's answer.

use super::*;

on_both_backends!(kill_9_while_draining_loses_nothing_and_marks_nothing_unaccepted);

async fn kill_9_while_draining_loses_nothing_and_marks_nothing_unaccepted(backend: Backend) {
    const ROWS: usize = 300;
    const CYCLES: usize = 5;
    let Some(world) = world_on(backend, Duration::from_millis(80)).await else {
        return;
    };
    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("K9-{i:04}")).collect();
    insert_many(&world, &ordernos, TAX).await;
    // Short lease so the killed daemons' rows are reclaimed quickly; a rate limit so that the
    // drain spans the kill cycles.
    let config = write_toml(
        &world,
        "kill9.toml",
        &[
            ("lease = \"3000ms\"", "lease = \"2s\""),
            (
                "rate_per_second = 1000\nmax_in_flight",
                "rate_per_second = 200\nmax_in_flight",
            ),
        ],
        "",
    );

    let mut running_at_kill = 0;
    for cycle in 0..CYCLES {
        let mut daemon = start_daemon(&world, &config, &format!("kill9-{cycle}.log"));
        let pause = Duration::from_millis(rand::random_range(50..400));
        tokio::time::sleep(pause).await;
        daemon.kill_9(&format!("cycle {cycle}"));
        let running = rebill_count(&world, "running").await;
        let done = rebill_count(&world, "done").await;
        running_at_kill += running;
        eprintln!("kill -9 cycle {cycle}: after {pause:?}: {done} done, {running} left running by the dead daemon");
    }
    let last_kill = Instant::now();

    let mut daemon = start_daemon(&world, &config, "kill9-final.log");
    wait_done(&world, ROWS, 60, "every row done after the last kill").await;
    let recovery = last_kill.elapsed();
    daemon.stop(Duration::from_secs(10), "final daemon");

    let in_table: HashSet<String> = rebill_rows(&world).await.into_iter().map(|r| r.0).collect();
    assert_eq!(in_table.len(), ROWS, "an orderno appears twice");
    assert_all_accepted(&world, ROWS, &["Accepted"]).await;
    let outcomes = world
        .count("SELECT COUNT(*) FROM rebill_orders WHERE outcome = 'accepted'")
        .await;
    assert_eq!(outcomes, ROWS as i64);
    let resent = verified_counts(&world).values().filter(|n| **n > 1).count();
    let retried = world
        .count("SELECT COUNT(*) FROM rebill_orders WHERE attempts > 1")
        .await;
    assert!(
        running_at_kill > 0,
        "no kill landed while a row was in flight; the test exercised nothing (raise the latency)"
    );
    assert!(
        retried > 0,
        "rows held by killed daemons should have been claimed again"
    );
    assert!(
        recovery < Duration::from_secs(60),
        "rows of the killed daemon took {recovery:?} to be done (SPEC: sent again within 60 s)"
    );
    eprintln!(
        "kill -9 ({backend:?}): {CYCLES} kills, {running_at_kill} rows left running in total, {resent} orders sent more than once, \
         {retried} rows with attempts > 1; all {ROWS} done {recovery:?} after the last kill"
    );
}
