//! The systemd notify protocol: READY, WATCHDOG, STATUS, STOPPING from the real binary to a
//! fake service manager, and watchdog pings withheld while a claim loop is stuck.

use super::*;

on_both_backends!(
    binary_speaks_the_systemd_notify_protocol,
    watchdog_pings_stop_while_a_claim_is_stuck_and_resume_after,
);

async fn binary_speaks_the_systemd_notify_protocol(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let ids = insert_rebills(&w, "NOTIFY-", 3, TAX).await;
    let config = write_toml(&w, "worker.toml", |t| t, "");
    let mut manager = Manager::bind(w.dir());
    let mut daemon = start_as_systemd(
        &config,
        w.dir().join("daemon.log"),
        &manager.path,
        1_000_000,
    );

    let ready = manager.wait_for(0, Duration::from_secs(20), "READY=1", |l| l == "READY=1");
    assert!(
        manager.seen[..ready].iter().all(|(_, l)| l != "WATCHDOG=1"),
        "no watchdog ping before READY=1: {:?}",
        manager.lines()
    );
    // WATCHDOG_USEC = 1 s: a ping every 500 ms while the loops tick.
    let first = manager.wait_for(ready, Duration::from_secs(3), "a watchdog ping", |l| {
        l == "WATCHDOG=1"
    });
    let since = manager.seen[first].0;
    let mut from = first + 1;
    for n in 0..4 {
        from = 1 + manager.wait_for(
            from,
            Duration::from_secs(3),
            &format!("watchdog ping {}", n + 2),
            |l| l == "WATCHDOG=1",
        );
    }
    let pings = manager.pings_since(since);
    let span = pings[pings.len() - 1] - pings[0];
    assert!(
        span < Duration::from_millis(900 * (pings.len() as u64 - 1)),
        "pings come faster than WATCHDOG_USEC: {} in {span:?}",
        pings.len()
    );

    manager.wait_for(
        0,
        Duration::from_secs(3),
        "STATUS= with queue depths",
        |l| {
            l.starts_with("STATUS=")
                && l.contains("rebill: ")
                && l.contains(" pending, ")
                && l.contains("title: ")
        },
    );
    wait_done(&w, &ids, Duration::from_secs(20)).await;
    // STATUS= is refreshed every 5 s: the depths move with the queue.
    manager.wait_for(
        0,
        Duration::from_secs(8),
        "STATUS= showing the rows done",
        |l| l.starts_with("STATUS=rebill: 0 pending, 0 running, 3 done, 0 failed"),
    );

    let before_stop = manager.seen.len();
    let log = daemon.stop(STOP_LIMIT, "SIGTERM");
    let stopping = manager.wait_for(before_stop, Duration::from_secs(5), "STOPPING=1", |l| {
        l == "STOPPING=1"
    });
    assert!(stopping >= before_stop);
    assert_eq!(
        manager.index_of("READY=1"),
        Some(ready),
        "READY=1 is sent once"
    );
    assert!(log.contains("systemd watchdog enabled"), "{log}");
}

async fn watchdog_pings_stop_while_a_claim_is_stuck_and_resume_after(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    // Claims wait up to a minute for SQLite's write lock instead of failing after 5 s (on
    // PostgreSQL a statement waits for a lock up to its 30 s statement timeout).
    let sqlite = w.config.database.url.is_none();
    let config = write_toml(
        &w,
        "worker.toml",
        |t| match sqlite {
            true => t.replacen("[database]\n", "[database]\nbusy_timeout = \"60s\"\n", 1),
            false => t,
        },
        "",
    );
    let mut manager = Manager::bind(w.dir());
    // WATCHDOG_USEC without WATCHDOG_PID: libsystemd reads that as "this process" too.
    let notify = manager.path.to_str().expect("utf-8 path").to_string();
    let mut daemon = Daemon::start_env(
        &config,
        w.dir().join("daemon.log"),
        &[
            ("NOTIFY_SOCKET", notify.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let ready = manager.wait_for(0, Duration::from_secs(20), "READY=1", |l| l == "READY=1");
    let ping = manager.wait_for(ready, Duration::from_secs(3), "a watchdog ping", |l| {
        l == "WATCHDOG=1"
    });
    manager.wait_for(
        ping + 1,
        Duration::from_secs(3),
        "a second watchdog ping",
        |l| l == "WATCHDOG=1",
    );

    // Rows become due in 2 s; meanwhile another process takes a lock and holds it. The
    // claim loop reads that rows are due (WAL readers are not blocked) and then waits for
    // SQLite's lock in BEGIN IMMEDIATE, or waits in its first read on PostgreSQL: stuck.
    let due_at = invoice_worker::store::now_ms() + 2_000;
    for i in 0..3 {
        w.writer
            .execute(
                "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) VALUES ($1, $2, $3)",
                &[
                    Arg::Text(format!("STUCK-{i}")),
                    Arg::Text(TAX.into()),
                    Arg::Int(due_at),
                ],
            )
            .await;
    }
    let lock = WriteLock::take(&w).await;
    let locked_at = Instant::now();

    // A loop whose heartbeat is older than max(WATCHDOG_USEC, 5 s) is stuck: the pings stop.
    // Wait until none has come for 6 s, longer than that limit (and than WATCHDOG_USEC,
    // after which systemd would have killed the daemon).
    let quiet_for = Duration::from_secs(6);
    let stopped_at = loop {
        let pings = manager.pings_since(locked_at);
        let last = pings.last().copied().unwrap_or(locked_at);
        if last.elapsed() >= quiet_for {
            break last;
        }
        assert!(
            locked_at.elapsed() < Duration::from_secs(20),
            "watchdog pings kept coming while the claim loop was stuck: {} since the lock",
            pings.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stopped_at - locked_at >= Duration::from_secs(4),
        "pings stopped only once the heartbeat was stale, not at once ({:?})",
        stopped_at - locked_at
    );
    manager.wait_for(0, Duration::from_secs(1), "STATUS= saying why", |l| {
        l.starts_with("STATUS=stuck") && l.contains("loop has not ticked")
    });

    lock.release().await;
    manager.pump();
    let released = manager.seen.len();
    manager.wait_for(released, Duration::from_secs(3), "pings to resume", |l| {
        l == "WATCHDOG=1"
    });
    let ids: Vec<i64> = w
        .writer
        .rows::<(i64,)>(
            "SELECT id FROM rebill_orders WHERE orderno LIKE 'STUCK-%'",
            &[],
        )
        .await
        .into_iter()
        .map(|(id,)| id)
        .collect();
    assert_eq!(ids.len(), 3);
    wait_done(&w, &ids, Duration::from_secs(20)).await;
    manager.wait_for(
        0,
        Duration::from_secs(6),
        "STATUS= with depths again",
        |l| l.starts_with("STATUS=rebill: 0 pending, 0 running, 3 done"),
    );

    let log = daemon.stop(STOP_LIMIT, "SIGTERM");
    assert!(
        log.contains("worker loop stuck: withholding watchdog pings"),
        "{log}"
    );
    assert!(log.contains("watchdog pings resumed"), "{log}");
}
