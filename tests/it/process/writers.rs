//! Other processes inserting while the daemon drains or starts, and holding the write lock:
//! the daemon waits them out without lock errors and loses nothing.

use super::*;

on_both_backends!(
    other_processes_insert_while_it_drains,
    three_daemons_drain_one_database_while_others_insert,
);

async fn other_processes_insert_while_it_drains(backend: Backend) {
    const LATENCY_SAMPLES: usize = 40;
    const ENQUEUES: usize = 100;
    const WAVE: usize = 10;
    const DIRECT: usize = 200;
    const BULK: usize = 200;
    let Some(world) = world_on(backend, Duration::from_millis(5)).await else {
        return;
    };
    // The shipped poll interval (not the tests' 20 ms), so the latency figure is the default's.
    let config = write_toml(
        &world,
        "inserts.toml",
        &[("poll_interval = \"20ms\"\n", "")],
        "",
    );
    let mut daemon = start_daemon(&world, &config, "inserts.log");
    daemon.wait_running().await;

    // Insert-to-attempt latency, one row at a time into an idle daemon.
    let mut latencies = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        tokio::time::sleep(Duration::from_millis(rand::random_range(20..60))).await;
        let orderno = format!("LAT-{i:03}");
        let id = world.insert_rebill(&orderno, TAX).await;
        let committed = Instant::now();
        let deadline = committed + Duration::from_secs(5);
        let received = loop {
            if let Some(r) = world
                .sim
                .rebill_requests()
                .into_iter()
                .find(|r| r.orderno == orderno)
            {
                break r.received_at;
            }
            assert!(
                Instant::now() < deadline,
                "{orderno} was not attempted within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        latencies.push(received.saturating_duration_since(committed));
        let w = &world;
        wait_until(
            Duration::from_secs(5),
            "latency row done",
            move || async move { w.status_of("rebill_orders", id).await == "done" },
        )
        .await;
    }
    latencies.sort();
    let (p50, p90) = (percentile(&latencies, 0.5), percentile(&latencies, 0.9));
    eprintln!(
        "insert-to-attempt latency ({backend:?}) over {LATENCY_SAMPLES} rows: p50 {p50:?}, p90 {p90:?}, max {:?}",
        latencies[latencies.len() - 1]
    );
    // The figure against the spec's 100 ms is the benchmark's (`pickup`): here, on a
    // machine busy with other tests, it is only shown.

    // A bulk insert keeps the daemon draining while the other writers start.
    let bulk: Vec<String> = (0..BULK).map(|i| format!("BULK-{i:04}")).collect();
    insert_many(&world, &bulk, TAX).await;

    // Direct inserts from this process, one transaction each, in the background.
    let writer = world.writer.clone();
    let direct = tokio::spawn(async move {
        let mut errors = Vec::new();
        for i in 0..DIRECT {
            let r = writer
                .try_execute(
                    "INSERT INTO rebill_orders (orderno, tax_num) VALUES ($1, $2)",
                    &[Arg::Text(format!("DIRECT-{i:04}")), Arg::text(TAX)],
                )
                .await;
            if let Err(e) = r {
                errors.push(e.to_string());
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        errors
    });

    // `invoice-worker enqueue rebill` processes, WAVE at a time.
    let started = Instant::now();
    let cfg = config.to_string_lossy().into_owned();
    let mut outputs = Vec::new();
    for wave in 0..ENQUEUES / WAVE {
        let children: Vec<Child> = (0..WAVE)
            .map(|j| {
                let orderno = format!("ENQ-{:04}", wave * WAVE + j);
                scrubbed_binary()
                    .args([
                        "enqueue",
                        "rebill",
                        "--tax-num",
                        TAX,
                        "--orderno",
                        &orderno,
                        "--config",
                        &cfg,
                    ])
                    .current_dir(world.dir())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn enqueue")
            })
            .collect();
        for child in children {
            outputs.push(child.wait_with_output().expect("enqueue output"));
        }
    }
    let enqueue_time = started.elapsed();
    let direct_errors = direct.await.expect("direct insert task");
    assert!(
        direct_errors.is_empty(),
        "direct inserts failed: {direct_errors:#?}"
    );
    for (i, out) in outputs.iter().enumerate() {
        expect_code(out, 0, &format!("enqueue #{i}"));
        let (so, se) = (text(&out.stdout), text(&out.stderr));
        assert!(so.contains("enqueued"), "enqueue #{i} stdout: {so}");
        let lower = se.to_ascii_lowercase();
        assert!(
            !lower.contains("locked") && !lower.contains("busy"),
            "enqueue #{i} stderr: {se}"
        );
    }

    let total = LATENCY_SAMPLES + BULK + DIRECT + ENQUEUES;
    wait_done(&world, total, 30, "every inserted row done").await;
    let log = daemon.stop(Duration::from_secs(10), "daemon");
    let busy = busy_lines(&log);
    assert!(
        busy.is_empty(),
        "daemon saw lock contention errors: {busy:#?}"
    );

    let verified = verified_counts(&world);
    assert_all_done(
        &world,
        total,
        |o| verified.contains_key(o),
        "never reached the simulator",
    )
    .await;
    eprintln!("concurrent writers ({backend:?}): {ENQUEUES} enqueue processes ({WAVE} at a time) in {enqueue_time:?} + {DIRECT} direct inserts; all {total} rows done");
}

/// Three daemon processes on one database while this process keeps inserting: every row
/// sent once, by whichever daemon claimed it, and all three did some of the work (calls
/// of 50 ms and 16 in flight per daemon: no one daemon can take a whole wave).
async fn three_daemons_drain_one_database_while_others_insert(backend: Backend) {
    const WAVES: usize = 6;
    const PER_WAVE: usize = 100;
    let Some(world) = world_on(backend, Duration::from_millis(50)).await else {
        return;
    };
    let config = world.write_config();
    let mut daemons: Vec<Daemon> = ["a", "b", "c"]
        .iter()
        .map(|name| start_daemon(&world, &config, &format!("three-{name}.log")))
        .collect();
    for daemon in &daemons {
        daemon.wait_running().await;
    }
    let started = Instant::now();
    for wave in 0..WAVES {
        let ordernos: Vec<String> = (0..PER_WAVE)
            .map(|i| format!("THREE-{wave}-{i:03}"))
            .collect();
        insert_many(&world, &ordernos, TAX).await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(20..120))).await;
    }
    let rows = WAVES * PER_WAVE;
    wait_done(&world, rows, 30, "every row done by the three daemons").await;
    let drained = started.elapsed();
    let logs: Vec<String> = daemons
        .iter_mut()
        .zip(["A", "B", "C"])
        .map(|(d, name)| d.stop(Duration::from_secs(10), name))
        .collect();
    assert_each_sent_once(&world, rows).await;
    let shares: Vec<usize> = logs
        .iter()
        .map(|log| log.lines().filter(|l| l.contains("orderno=THREE-")).count())
        .collect();
    assert_eq!(
        shares.iter().sum::<usize>(),
        rows,
        "attempt lines in the logs"
    );
    assert!(
        shares.iter().all(|n| *n > 0),
        "a daemon did none of the work ({shares:?}); no contention was tested"
    );
    for log in &logs {
        assert!(
            !log.contains("claim failed"),
            "a daemon's claims failed:\n{log}"
        );
    }
    eprintln!("three daemons ({backend:?}): {rows} rows inserted in {WAVES} waves, drained in {drained:?}, split {shares:?}, 0 sent twice");
}

/// A writer in another process, as other systems are: Python's sqlite3 module inserting
/// one row per transaction, a millisecond apart, until `stop` exists, then printing `inserted=N errors=M` and
/// every error. None when python3 is missing (a loud skip outside CI, a failure in CI).
fn python_writer(db: &Path, prefix: &str, stop: &Path) -> Option<Child> {
    python_writer_paced(db, prefix, stop, 0.001, WRITER_LIMIT)
}

/// The longest a writer process runs: a test that fails before it writes the stop file
/// must not leave writers hammering the machine (they also stop when the test's directory
/// is gone).
const WRITER_LIMIT: Duration = Duration::from_secs(120);

/// [`python_writer`] with `pause` seconds between inserts (0: back to back), writing for at
/// most `limit`.
fn python_writer_paced(
    db: &Path,
    prefix: &str,
    stop: &Path,
    pause: f64,
    limit: Duration,
) -> Option<Child> {
    const SCRIPT: &str = r#"
import os, sqlite3, sys, time
db, prefix, stop, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + float(sys.argv[5])
conn = sqlite3.connect(db, timeout=5, isolation_level=None)
inserted, errors = 0, []
while not os.path.exists(stop) and os.path.exists(db) and time.monotonic() < deadline:
    try:
        conn.execute("INSERT INTO rebill_orders (orderno, tax_num) VALUES (?, ?)",
                     ("%s-%06d" % (prefix, inserted), "91310117568051222X"))
        inserted += 1
    except sqlite3.Error as e:
        errors.append(str(e))
    # A writer that spins without pause starves the others (SQLite's busy handler polls
    # with sleeps, it does not queue): even without the daemon, four tight loops see
    # "database is locked" now and then. A millisecond apart, four writers still insert
    # about 2,000 rows a second.
    if pause > 0:
        time.sleep(pause)
print("inserted=%d errors=%d" % (inserted, len(errors)))
for e in errors[:20]:
    print(e)
"#;
    match std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(db)
        .arg(prefix)
        .arg(stop)
        .arg(pause.to_string())
        .arg(limit.as_secs_f64().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => Some(child),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "python3 is needed for the writer processes: {e}"
            );
            eprintln!("!!!!! SKIPPED: python3 not found ({e}); writer-process test not run !!!!!");
            None
        }
    }
}

/// Starts the daemon `starts` times in a row (logs `{prefix}-N.log`), each time letting it
/// claim and send a little before stopping it; the starts whose log has an ERROR or WARN
/// line, or a line `also_bad` picks, with those lines.
async fn start_and_stop(
    world: &World,
    config: &Path,
    starts: usize,
    prefix: &str,
    also_bad: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    for start in 0..starts {
        let mut daemon = start_daemon(world, config, &format!("{prefix}-{start}.log"));
        daemon.wait_running().await;
        // Let it claim and send a little while the writers go on.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let log = daemon.stop(Duration::from_secs(15), &format!("start {start}"));
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN ") || also_bad(l))
            .collect();
        if !bad.is_empty() {
            failures.push(format!("start {start}: {bad:#?}"));
        }
    }
    failures
}

/// No start logged a problem, and every row the writers say they inserted is in the table.
async fn assert_starts_clean_and_nothing_lost(
    world: &World,
    failures: &[String],
    starts: usize,
    inserted: i64,
) {
    assert!(
        failures.is_empty(),
        "{} of {starts} starts logged problems: {failures:#?}",
        failures.len()
    );
    assert_eq!(
        world.count("SELECT COUNT(*) FROM rebill_orders").await,
        inserted,
        "every row a writer inserted is in the table"
    );
}

/// The daemon starts cleanly (migrations, WAL, the commit watcher, the first claims) while
/// four other processes insert as fast as they can, twenty times in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_starts_cleanly_while_four_processes_write() {
    const STARTS: usize = 20;
    let world = World::new().await;
    let config = write_toml(&world, "starts.toml", &[], "");
    // Private, as a config holding secrets should be (else the daemon rightly warns).
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let stop = world.dir().join("writers-stop");
    let db = world.config.database.path.clone();
    let mut writers = Vec::new();
    for w in 0..4 {
        match python_writer(&db, &format!("W{w}"), &stop) {
            Some(child) => writers.push(child),
            None => return,
        }
    }
    // Let the writers get going before the first start.
    wait_until(Duration::from_secs(10), "writers inserting", || async {
        world.count("SELECT COUNT(*) FROM rebill_orders").await >= 40
    })
    .await;
    let failures = start_and_stop(&world, &config, STARTS, "start", |l| {
        busy_lines(l).len() == 1
    })
    .await;
    std::fs::write(&stop, b"").expect("stop file");
    let mut inserted = 0;
    for writer in writers {
        let out = writer.wait_with_output().expect("writer output");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "writer failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("errors=0"), "a writer saw errors: {text}");
        inserted += text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("inserted="))
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(0);
    }
    assert_starts_clean_and_nothing_lost(&world, &failures, STARTS, inserted).await;
    eprintln!(
        "{STARTS} daemon starts while 4 writer processes inserted {inserted} rows: 0 failures"
    );
}

/// The same on PostgreSQL: the daemon starts cleanly (migrations checked under their
/// advisory lock, LISTEN, the first claims) ten times in a row while four writers, each on
/// its own connection, insert back to back; no error or warning, no writer error, every
/// row inserted is in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_starts_cleanly_on_postgresql_while_four_writers_insert() {
    const STARTS: usize = 10;
    let Some(world) = World::on(Backend::Postgres).await else {
        return;
    };
    let config = write_toml(&world, "pg-starts.toml", &[], "");
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let url = world
        .config
        .database
        .url
        .clone()
        .expect("a PostgreSQL world");
    let stop = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await.expect("writer");
                let (mut inserted, mut errors) = (0i64, Vec::new());
                while !stop.is_cancelled() {
                    match sqlx::query(
                        "INSERT INTO rebill_orders (orderno, tax_num) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    )
                    .bind(format!("W{w}-{inserted}"))
                    .bind(TAX)
                    .execute(&mut conn)
                    .await
                    {
                        Ok(_) => inserted += 1,
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (inserted, errors)
            })
        })
        .collect();
    wait_until(Duration::from_secs(10), "writers inserting", || async {
        world.count("SELECT COUNT(*) FROM rebill_orders").await >= 40
    })
    .await;
    let failures = start_and_stop(&world, &config, STARTS, "pg-start", |_| false).await;
    stop.cancel();
    let mut inserted = 0;
    for writer in writers {
        let (n, errors) = writer.await.expect("writer task");
        assert!(errors.is_empty(), "a writer saw errors: {errors:?}");
        inserted += n;
    }
    assert_starts_clean_and_nothing_lost(&world, &failures, STARTS, inserted).await;
    eprintln!(
        "{STARTS} daemon starts on PostgreSQL while 4 writers inserted {inserted} rows: 0 failures"
    );
}

/// How long the tight-loop writers hammer the database.
const HAMMER_FOR: Duration = Duration::from_secs(15);

/// Four writer processes inserting back to back (no pause at all) for [`HAMMER_FOR`] while
/// the daemon drains: they starve each other and the daemon now and then past the busy
/// timeout (SQLite's busy handler polls, it does not queue), and the daemon takes that as a
/// busy database to try again, never as a failure: no "database is locked" in its log, and
/// every row done (during the hammering on a quiet machine, soon after it on a busy one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tight_loop_writers_never_make_the_daemon_log_a_lock_error() {
    const ROWS: usize = 200;
    let world = World::new().await;
    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("TIGHT-{i:03}")).collect();
    insert_many(&world, &ordernos, TAX).await;
    let config = write_toml(&world, "tight.toml", &[], "");
    let stop = world.dir().join("tight-stop");
    let mut writers = Vec::new();
    for w in 0..4 {
        // Hammering for a bounded time: on a machine busy with other tests, four tight
        // loops can starve the daemon for minutes (SQLite's busy handler polls with sleeps;
        // it does not queue), which is what the test must survive quietly, not outlast.
        let db = &world.config.database.path;
        match python_writer_paced(db, &format!("T{w}"), &stop, 0.0, HAMMER_FOR) {
            Some(child) => writers.push(child),
            None => return,
        }
    }
    let mut daemon = start_daemon(&world, &config, "tight.log");
    daemon.wait_running().await;
    let done = || async {
        world
            .count("SELECT COUNT(*) FROM rebill_orders WHERE orderno LIKE 'TIGHT-%' AND status = 'done'")
            .await
    };
    let hammering = std::time::Instant::now();
    while done().await < ROWS as i64 && hammering.elapsed() < HAMMER_FOR {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "tight-loop: {} of {ROWS} rows done while the writers hammered ({:.1}s)",
        done().await,
        hammering.elapsed().as_secs_f64()
    );
    std::fs::write(&stop, b"").expect("stop file");
    wait_until(
        Duration::from_secs(120),
        "the daemon's rows done",
        || async { done().await == ROWS as i64 },
    )
    .await;
    for writer in writers {
        let out = writer.wait_with_output().expect("writer output");
        eprintln!(
            "tight-loop writer: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    let log = daemon.stop(Duration::from_secs(30), "daemon");
    let busy = busy_lines(&log);
    assert!(busy.is_empty(), "the daemon logged lock errors: {busy:#?}");
}

/// Another process holding the write lock for longer than the daemon's busy timeout is
/// waited out as a busy database: the daemon retries, logs no lock error, and drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_held_past_the_busy_timeout_is_waited_out_quietly() {
    use sqlx::Connection;
    let world = World::new().await;
    let config = write_toml(
        &world,
        "held.toml",
        &[("[database]\n", "[database]\nbusy_timeout = \"200ms\"\n")],
        "",
    );
    let mut daemon = start_daemon(&world, &config, "held.log");
    daemon.wait_running().await;
    let mut holder = crate::common::other_connection(&world.config.database.path).await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("begin");
    sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES ('HELD-1', ?1)")
        .bind(TAX)
        .execute(&mut holder)
        .await
        .expect("insert");
    sqlx::query("COMMIT")
        .execute(&mut holder)
        .await
        .expect("commit");
    // The row is due; now hold the lock for seven busy timeouts while the daemon claims.
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("begin");
    tokio::time::sleep(Duration::from_millis(1400)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("rollback");
    holder.close().await.expect("close");
    wait_done(&world, 1, 20, "the row done once the lock was released").await;
    let log = daemon.stop(Duration::from_secs(10), "daemon");
    let busy = busy_lines(&log);
    assert!(busy.is_empty(), "the daemon logged lock errors: {busy:#?}");
}
