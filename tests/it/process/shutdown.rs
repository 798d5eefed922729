//! SIGTERM and SIGINT: calls in flight finish within the grace, the rest go back to pending
//! with their attempt refunded, and nothing new starts once the stop is asked.

use super::*;

on_both_backends!(
    sigterm_lets_calls_in_flight_finish_within_grace,
    sigterm_past_grace_returns_rows_to_pending_with_attempt_refunded,
    sigint_stops_an_idle_daemon_whose_queues_lack_credentials,
    sigterm_starts_no_new_calls_for_rows_waiting_on_the_rate_limit,
);

async fn sigterm_lets_calls_in_flight_finish_within_grace(backend: Backend) {
    let Some(world) = World::on(backend).await else {
        return;
    };
    let ordernos: Vec<String> = (0..3).map(|i| format!("GRACE-{i}")).collect();
    script_delay(&world, &ordernos, Duration::from_millis(1500));
    insert_many(&world, &ordernos, TAX).await;
    // Grace (5 s in the standard config) is longer than the 1.5 s calls.
    let config = world.write_config();
    let mut daemon = start_daemon(&world, &config, "grace.log");
    wait_in_flight(&world, &ordernos).await;

    let signalled = Instant::now();
    daemon.signal(Signal::SIGTERM);
    // Claiming stops at once: a row inserted after shutdown began is left alone.
    daemon
        .wait_for_log("shutdown requested", Duration::from_secs(3))
        .await;
    let late = world.insert_rebill("GRACE-LATE", TAX).await;
    let status = daemon.wait(Duration::from_secs(10));
    let took = signalled.elapsed();
    let log = daemon.assert_exit(status, 0, "SIGTERM with calls in flight");
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?}, longer than the 5 s grace; log:\n{log}"
    );

    let rows: Vec<(String, String, Option<String>, i64)> = world
        .writer
        .rows(
            "SELECT orderno, status, outcome, attempts FROM rebill_orders WHERE orderno LIKE 'GRACE-_' ORDER BY id",
            &[],
        )
        .await;
    assert_eq!(rows.len(), 3);
    for (orderno, status, outcome, attempts) in &rows {
        assert_eq!(
            status, "done",
            "{orderno} should have finished within grace; log:\n{log}"
        );
        assert_eq!(outcome.as_deref(), Some("accepted"), "{orderno}");
        assert_eq!(*attempts, 1, "{orderno}");
    }
    assert_eq!(
        world.status_of("rebill_orders", late).await,
        "pending",
        "a row inserted after SIGTERM was claimed"
    );
    assert!(
        !world
            .sim
            .rebill_requests()
            .iter()
            .any(|r| r.orderno == "GRACE-LATE"),
        "a row inserted after SIGTERM was sent"
    );

    assert_log_has(
        &log,
        &[
            "SIGTERM received",
            "shutdown requested",
            "stopping: no new claims",
            "stopped",
        ],
    );
    assert!(
        !log.contains("grace period over"),
        "calls were abandoned although they fit the grace period:\n{log}"
    );
    eprintln!("graceful SIGTERM: exit 0 after {took:?} with 3 calls of 1.5 s in flight");
}

async fn sigterm_past_grace_returns_rows_to_pending_with_attempt_refunded(backend: Backend) {
    let Some(world) = World::on(backend).await else {
        return;
    };
    let ordernos: Vec<String> = (0..3).map(|i| format!("SLOW-{i}")).collect();
    script_delay(&world, &ordernos, Duration::from_secs(5));
    insert_many(&world, &ordernos, TAX).await;
    let config = write_toml(
        &world,
        "short-grace.toml",
        &[
            ("shutdown_grace = \"5000ms\"", "shutdown_grace = \"300ms\""),
            ("timeout = \"2000ms\"", "timeout = \"10s\""),
        ],
        "",
    );
    let mut daemon = start_daemon(&world, &config, "short-grace.log");
    wait_in_flight(&world, &ordernos).await;

    let (took, log) = daemon.stop_with(
        Signal::SIGTERM,
        Duration::from_secs(10),
        "SIGTERM past grace",
    );
    // Well under the 5 s calls (a busy machine needs some of the margin).
    assert!(
        took < Duration::from_secs(4),
        "exit took {took:?}: the 300 ms grace was not applied to 5 s calls; log:\n{log}"
    );

    let rows: Vec<(String, String, i64, Option<String>)> = world
        .writer
        .rows(
            "SELECT orderno, status, attempts, claim_token FROM rebill_orders ORDER BY id",
            &[],
        )
        .await;
    for (orderno, status, attempts, token) in &rows {
        assert_eq!(
            status, "pending",
            "{orderno}: unfinished row not returned; log:\n{log}"
        );
        assert_eq!(*attempts, 0, "{orderno}: the abandoned attempt was counted");
        assert!(token.is_none(), "{orderno}: claim token left behind");
    }
    assert_eq!(rebill_count(&world, "running").await, 0);
    assert_log_has(
        &log,
        &[
            "SIGTERM received",
            "grace period over",
            "returned to pending",
            "stopped",
        ],
    );
    eprintln!("SIGTERM past grace: exit 0 after {took:?}; 3 rows back to pending, attempts 0");
}

async fn sigint_stops_an_idle_daemon_whose_queues_lack_credentials(backend: Backend) {
    let Some(world) = World::on(backend).await else {
        return;
    };
    let dir = world.dir();
    // No credentials at all (and none from the environment, which `Daemon` scrubs): both
    // queues are disabled with a log line; the daemon still runs.
    let config = dir.join("no-credentials.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\n{}\n[worker]\npoll_interval = \"20ms\"\n[housekeeping]\nenabled = false\n",
            database_line(&world.config)
        ),
    )
    .expect("write config");
    let mut daemon = start_daemon(&world, &config, "no-credentials.log");
    daemon.wait_running().await;
    let id = world.insert_rebill("NOCREDS-1", TAX).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "daemon exited without credentials:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        world.status_of("rebill_orders", id).await,
        "pending",
        "a disabled queue claimed a row"
    );

    let (took, log) = daemon.stop_with(Signal::SIGINT, Duration::from_secs(10), "SIGINT");
    assert!(
        took < Duration::from_secs(3),
        "idle daemon took {took:?} to stop on SIGINT"
    );
    assert_log_has(
        &log,
        &[
            "rebill queue disabled",
            "title queue disabled",
            "SIGINT received",
            "stopped",
        ],
    );
    assert_eq!(world.status_of("rebill_orders", id).await, "pending");
    assert!(world.sim.rebill_requests().is_empty());
}

async fn sigterm_starts_no_new_calls_for_rows_waiting_on_the_rate_limit(backend: Backend) {
    const ROWS: usize = 8;
    let Some(world) = World::on(backend).await else {
        return;
    };
    // One request per second: the 8 claimed rows queue up behind the limiter.
    let config = write_toml(
        &world,
        "rate-1.toml",
        &[(
            "rate_per_second = 1000\nmax_in_flight = 16",
            "rate_per_second = 1\nmax_in_flight = 8",
        )],
        "",
    );
    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("RATE-{i}")).collect();
    insert_many(&world, &ordernos, TAX).await;
    let mut daemon = start_daemon(&world, &config, "rate-1.log");
    wait_until(Duration::from_secs(15), "two requests sent", || {
        let n = world.sim.rebill_requests().len();
        async move { n >= 2 }
    })
    .await;
    wait_rows(
        &world,
        "pending",
        0,
        Duration::from_secs(5),
        "all rows claimed",
    )
    .await;

    let signalled = Instant::now();
    let (took, log) = daemon.stop_with(
        Signal::SIGTERM,
        Duration::from_secs(15),
        "SIGTERM with rows waiting on the limiter",
    );
    let late: Vec<String> = world
        .sim
        .rebill_requests()
        .into_iter()
        .filter(|r| r.received_at > signalled + Duration::from_millis(250))
        .map(|r| r.orderno)
        .collect();
    assert!(
        late.is_empty(),
        "calls started after SIGTERM: {late:?}; log:\n{log}"
    );
    assert!(
        took < Duration::from_secs(2),
        "nothing was in flight, yet stopping took {took:?}"
    );
    let sent: HashSet<String> = world
        .sim
        .rebill_requests()
        .into_iter()
        .map(|r| r.orderno)
        .collect();
    for (orderno, status, attempts) in rebill_rows(&world).await {
        if !sent.contains(&orderno) {
            assert_eq!(
                (status.as_str(), attempts),
                ("pending", 0),
                "{orderno}: unsent row not returned intact"
            );
        }
    }
}
