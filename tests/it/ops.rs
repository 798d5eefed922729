//! Operations: the real binary speaking the systemd notify protocol to a fake service
//! manager (READY, WATCHDOG, STATUS, STOPPING) and going quiet on the watchdog while a claim
//! loop is stuck; `/metrics` and `/healthz` moving with the queues; JSON and plain-text logs.
//!
//! The metrics recorder is process-global, so every test that scrapes an in-process daemon
//! lives in this one binary and none assumes counters start at zero.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::common::{config_toml, wait_until, Daemon, World, TAX};
use invoice_worker::sim::SimOptions;
use invoice_worker::store::{now_ms, QueueName};
use sqlx::ConnectOptions;

const OTHER_SELLER: &str = "91440300715267260A";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The service manager's end of `NOTIFY_SOCKET`: every line of every datagram, with the
/// time it arrived.
struct Manager {
    path: PathBuf,
    rx: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    stop: Arc<AtomicBool>,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let done = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            while !done.load(Ordering::Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let at = Instant::now();
                for line in String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .filter(|l| !l.is_empty())
                {
                    if tx.send((at, line.to_string())).is_err() {
                        return;
                    }
                }
            }
        });
        Manager {
            path,
            rx,
            seen: Vec::new(),
            stop,
        }
    }

    /// Moves what arrived so far into `seen`.
    fn pump(&mut self) {
        while let Ok(message) = self.rx.try_recv() {
            self.seen.push(message);
        }
    }

    /// Waits for a message at index `from` or later that satisfies `pred`; its index.
    fn wait_for(
        &mut self,
        from: usize,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> usize {
        let start = Instant::now();
        loop {
            self.pump();
            if let Some(i) = (from..self.seen.len()).find(|&i| pred(&self.seen[i].1)) {
                return i;
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; got {:?}",
                self.lines()
            );
            if let Ok(message) = self.rx.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(message);
            }
        }
    }

    fn lines(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, l)| l.as_str()).collect()
    }

    /// Arrival times of `WATCHDOG=1` after `since`.
    fn pings_since(&mut self, since: Instant) -> Vec<Instant> {
        self.pump();
        self.seen
            .iter()
            .filter(|(at, l)| *at >= since && l == "WATCHDOG=1")
            .map(|(at, _)| *at)
            .collect()
    }

    fn index_of(&self, line: &str) -> Option<usize> {
        self.seen.iter().position(|(_, l)| l == line)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts the daemon like systemd starts a `Type=notify` service with `WatchdogSec=`:
/// `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` naming the main process (set by a
/// shell that then `exec`s the binary, so the pid is the daemon's).
fn start_as_systemd(config: &Path, log: PathBuf, notify: &Path, watchdog_usec: u64) -> Daemon {
    let mut sh = Command::new("/bin/sh");
    sh.arg("-c")
        .arg(r#"export WATCHDOG_PID=$$; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_invoice-worker"));
    let usec = watchdog_usec.to_string();
    let notify = notify.to_str().expect("utf-8 socket path");
    Daemon::start_with(
        sh,
        config,
        log,
        &[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", &usec)],
    )
}

/// How long a daemon may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// Runs a daemon (`env` added) until the row `id` is done, stops it with SIGTERM
/// (asserting a clean exit) and returns its log.
async fn run_until_done(
    w: &World,
    config: &Path,
    log: &str,
    env: &[(&str, &str)],
    id: i64,
) -> String {
    let mut daemon = Daemon::start_env(config, w.dir().join(log), env);
    wait_done(w, &[id], Duration::from_secs(20)).await;
    daemon.stop(STOP_LIMIT, "SIGTERM")
}

/// The world's config as TOML for the binary, with `edit` applied and `extra` appended.
fn write_toml(w: &World, name: &str, edit: impl Fn(String) -> String, extra: &str) -> PathBuf {
    let path = w.dir().join(name);
    let text = edit(config_toml(&w.config, &SimOptions::default())) + extra;
    std::fs::write(&path, text).expect("write config");
    path
}

async fn insert_rebills(w: &World, prefix: &str, n: usize, tax_num: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(w.insert_rebill(&format!("{prefix}{i}"), tax_num).await);
    }
    ids
}

async fn wait_done(w: &World, ids: &[i64], limit: Duration) {
    wait_until(limit, "rows to be done", || async {
        for id in ids {
            if w.status_of("rebill_orders", *id).await != "done" {
                return false;
            }
        }
        true
    })
    .await;
}

/// A port that was free a moment ago (the daemon's `[http] listen` cannot be port 0: the
/// test would not know where to connect).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

async fn get(client: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let response = client.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// One Prometheus text exposition: (name, labels, value) per sample.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value: f64 = value.parse().expect("sample value is a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (
                    name,
                    parse_labels(rest.strip_suffix('}').expect("closing brace")),
                ),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Scrape { text, samples }
    }

    /// The value of the sample `name` whose labels include all of `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let end = after.find('"').expect("closing quote");
        labels.insert(
            key.trim_start_matches(',').to_string(),
            after[..end].to_string(),
        );
        rest = &after[end + 1..];
    }
    labels
}

async fn scrape(client: &reqwest::Client, base: &str) -> Scrape {
    let (status, text) = get(client, &format!("{base}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    Scrape::parse(text)
}

/// Scrapes until `check` holds, or panics with the last scrape.
async fn scrape_until(
    client: &reqwest::Client,
    base: &str,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let start = Instant::now();
    loop {
        let s = scrape(client, base).await;
        if check(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}; last scrape:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// systemd notify protocol
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_speaks_the_systemd_notify_protocol() {
    let w = World::new().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_while_a_claim_is_stuck_and_resume_after() {
    let w = World::new().await;
    // Claims wait up to a minute for the write lock instead of failing after 5 s.
    let config = write_toml(
        &w,
        "worker.toml",
        |t| t.replacen("[database]\n", "[database]\nbusy_timeout = \"60s\"\n", 1),
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

    // Rows become due in 2 s; meanwhile another process takes the write lock and holds it.
    // The claim loop reads that rows are due (WAL readers are not blocked) and then waits
    // for the lock in BEGIN IMMEDIATE: it is stuck.
    let due_at = invoice_worker::store::now_ms() + 2_000;
    for i in 0..3 {
        sqlx::query(
            "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) VALUES (?1, ?2, ?3)",
        )
        .bind(format!("STUCK-{i}"))
        .bind(TAX)
        .bind(due_at)
        .execute(&w.sql)
        .await
        .expect("insert");
    }
    let mut writer = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&w.config.database.path)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("writer connection");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut writer)
        .await
        .expect("BEGIN EXCLUSIVE");
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

    sqlx::query("COMMIT")
        .execute(&mut writer)
        .await
        .expect("COMMIT");
    manager.pump();
    let released = manager.seen.len();
    manager.wait_for(released, Duration::from_secs(3), "pings to resume", |l| {
        l == "WATCHDOG=1"
    });
    let ids: Vec<i64> =
        sqlx::query_as::<_, (i64,)>("SELECT id FROM rebill_orders WHERE orderno LIKE 'STUCK-%'")
            .fetch_all(&w.sql)
            .await
            .expect("ids")
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

// ---------------------------------------------------------------------------------------
// /metrics and /healthz
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_move_with_the_queues() {
    let mut w = World::new().await;
    let port = free_port();
    w.config.http.listen = Some(format!("127.0.0.1:{port}").parse().expect("socket address"));
    let daemon = w.start_alone_with_metrics().await;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");

    wait_until(
        Duration::from_secs(10),
        "/healthz to answer 200",
        || async {
            matches!(
                get(&client, &format!("{base}/healthz")).await,
                Some((200, _))
            )
        },
    )
    .await;
    let (_, body) = get(&client, &format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(body.trim(), "ok");

    let rebill_done = [("queue", "rebill"), ("action", "done")];
    let latency_count = "invoice_worker_request_duration_seconds_count";
    let before = scrape(&client, &base).await;
    let done_before = before
        .value("invoice_worker_attempts_total", &rebill_done)
        .unwrap_or(0.0);
    let calls_before = before
        .value(latency_count, &[("queue", "rebill")])
        .unwrap_or(0.0);

    // Attempts and depths move as rows are done.
    let ids = insert_rebills(&w, "METRICS-", 5, TAX).await;
    wait_done(&w, &ids, Duration::from_secs(20)).await;
    let after = scrape_until(&client, &base, "attempts counted", |s| {
        s.value("invoice_worker_attempts_total", &rebill_done)
            .unwrap_or(0.0)
            >= done_before + 5.0
    })
    .await;
    let depth = |s: &Scrape, status: &str| {
        s.value(
            "invoice_worker_queue_depth",
            &[("queue", "rebill"), ("status", status)],
        )
    };
    assert_eq!(depth(&after, "done"), Some(5.0), "{}", after.text);
    assert_eq!(depth(&after, "pending"), Some(0.0));
    assert_eq!(depth(&after, "running"), Some(0.0));
    assert_eq!(
        after.value(
            "invoice_worker_queue_depth",
            &[("queue", "title"), ("status", "pending")]
        ),
        Some(0.0)
    );
    assert!(
        after
            .value(latency_count, &[("queue", "rebill")])
            .unwrap_or(0.0)
            >= calls_before + 5.0,
        "{}",
        after.text
    );
    assert!(after
        .value(
            "invoice_worker_request_duration_seconds_bucket",
            &[("queue", "rebill"), ("le", "+Inf")]
        )
        .is_some());
    assert_eq!(
        after.value(
            "invoice_worker_oldest_pending_age_seconds",
            &[("queue", "rebill")]
        ),
        Some(0.0)
    );
    assert_eq!(
        after.value("invoice_worker_paused_sellers", &[("queue", "rebill")]),
        Some(0.0)
    );
    assert_eq!(
        after.value("invoice_worker_queue_paused", &[("queue", "rebill")]),
        Some(0.0)
    );
    assert!(
        after.text.contains("# HELP invoice_worker_attempts_total"),
        "{}",
        after.text
    );
    assert!(
        after
            .text
            .contains("# TYPE invoice_worker_request_duration_seconds histogram"),
        "{}",
        after.text
    );

    // A paused seller: the gauge says so, and its due row waits and ages.
    let until = now_ms() + 60_000;
    w.store
        .pause(QueueName::Rebill, OTHER_SELLER, until, "test pause")
        .await
        .expect("pause seller");
    let waiting = w.insert_rebill("METRICS-PAUSED", OTHER_SELLER).await;
    scrape_until(
        &client,
        &base,
        "a paused seller with an ageing pending row",
        |s| {
            s.value("invoice_worker_paused_sellers", &[("queue", "rebill")]) == Some(1.0)
                && depth(s, "pending") == Some(1.0)
                && s.value(
                    "invoice_worker_oldest_pending_age_seconds",
                    &[("queue", "rebill")],
                )
                .unwrap_or(0.0)
                    >= 0.3
        },
    )
    .await;
    // The whole queue paused.
    w.store
        .pause(QueueName::Rebill, "*", until, "test pause")
        .await
        .expect("pause queue");
    scrape_until(&client, &base, "the queue paused", |s| {
        s.value("invoice_worker_queue_paused", &[("queue", "rebill")]) == Some(1.0)
            && s.value("invoice_worker_queue_paused", &[("queue", "title")]) == Some(0.0)
    })
    .await;
    // Resumed: gauges back to 0 and the waiting row goes through.
    assert!(w
        .store
        .resume(QueueName::Rebill, "*")
        .await
        .expect("resume queue"));
    assert!(w
        .store
        .resume(QueueName::Rebill, OTHER_SELLER)
        .await
        .expect("resume seller"));
    wait_done(&w, &[waiting], Duration::from_secs(20)).await;
    scrape_until(&client, &base, "pauses lifted and the row done", |s| {
        s.value("invoice_worker_paused_sellers", &[("queue", "rebill")]) == Some(0.0)
            && s.value("invoice_worker_queue_paused", &[("queue", "rebill")]) == Some(0.0)
            && depth(s, "done") == Some(6.0)
            && depth(s, "pending") == Some(0.0)
            && s.value(
                "invoice_worker_oldest_pending_age_seconds",
                &[("queue", "rebill")],
            ) == Some(0.0)
    })
    .await;

    let (status, _) = get(&client, &format!("{base}/nope"))
        .await
        .expect("GET /nope");
    assert_eq!(status, 404);

    // The database goes away: /healthz says 503 and why.
    w.store.close().await;
    let (status, body) = get(&client, &format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("unhealthy: database"), "{body}");
    // The daemon cannot put anything back without its database; only its end matters here.
    daemon.token.cancel();
    let _ = daemon.handle.await;
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_attempt_fields() {
    let w = World::new().await;
    let id = w.insert_rebill("JSON-1", TAX).await;
    let config = write_toml(
        &w,
        "worker.toml",
        |t| t,
        "\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
    );
    let log = run_until_done(&w, &config, "daemon.log", &[], id).await;

    let mut attempt = None;
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nwhole log:\n{log}"));
        assert!(
            value.get("timestamp").is_some() && value.get("level").is_some(),
            "{line}"
        );
        if value["message"] == "attempt" && value["row_id"] == id {
            attempt = Some(value);
        }
    }
    assert!(lines >= 3, "startup, attempt and stop lines: {log}");
    let attempt = attempt.unwrap_or_else(|| panic!("no attempt line for row {id}:\n{log}"));
    for field in [
        "queue",
        "row_id",
        "orderno",
        "tax_num",
        "attempt",
        "action",
        "http_status",
        "code",
        "reason",
        "duration_ms",
    ] {
        assert!(
            attempt.get(field).is_some(),
            "attempt line lacks {field}: {attempt}"
        );
    }
    assert_eq!(attempt["queue"], "rebill");
    assert_eq!(attempt["orderno"], "JSON-1");
    assert_eq!(attempt["tax_num"], TAX);
    assert_eq!(attempt["attempt"], 1);
    assert_eq!(attempt["action"], "done");
    assert_eq!(attempt["http_status"], 200);
    assert_eq!(attempt["level"], "INFO");
    assert!(attempt["duration_ms"].is_u64(), "{attempt}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_have_no_colour_and_rust_log_overrides_the_configured_level() {
    let w = World::new().await;
    let config = write_toml(&w, "worker.toml", |t| t, "\n[log]\nlevel = \"warn\"\n");

    // [log] level = "warn": no info lines, so no attempt lines.
    let quiet_id = w.insert_rebill("TEXT-QUIET", TAX).await;
    let log = run_until_done(&w, &config, "quiet.log", &[], quiet_id).await;
    assert!(
        !log.contains(" INFO "),
        "level warn logs no info lines:\n{log}"
    );

    // RUST_LOG=info wins over the file.
    let loud_id = w.insert_rebill("TEXT-LOUD", TAX).await;
    let log = run_until_done(&w, &config, "loud.log", &[("RUST_LOG", "info")], loud_id).await;
    let line = log
        .lines()
        .find(|l| l.contains(" attempt ") && l.contains("orderno=TEXT-LOUD"))
        .unwrap_or_else(|| panic!("an attempt line for TEXT-LOUD:\n{log}"));
    assert!(line.contains(" INFO "), "{line}");
    for field in [
        "queue=\"rebill\"",
        "row_id=",
        "tax_num=",
        "attempt=1",
        "action=\"done\"",
        "http_status=200",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "attempt line lacks {field}: {line}");
    }
    // stderr is a file, not a terminal: no ANSI colour codes anywhere.
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a non-terminal log:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------------------

/// A small file system of the test's own (tmpfs, which needs root to mount), unmounted when
/// dropped. `None`, with one loud line, where it cannot be mounted outside CI.
struct SmallDisk {
    dir: PathBuf,
    filler: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(SmallDisk {
                dir: dir.to_path_buf(),
                filler: dir.join("filler"),
            }),
            other => {
                let why = match other {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "cannot mount a small tmpfs (the CI machine runs as root): {why}"
                );
                eprintln!("!!!!! SKIPPED: cannot mount a small tmpfs ({why}); full-disk test not run (run as root) !!!!!");
                None
            }
        }
    }

    /// Writes a file until the file system is full.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(&self.filler).expect("filler");
        let chunk = vec![0u8; 16 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.flush();
    }

    /// Gives the space back.
    fn free(&self) {
        std::fs::remove_file(&self.filler).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The daemon on a file system that fills up mid-drain: it says so, `/healthz` turns 503,
/// nothing is lost or corrupted, it recovers by itself within seconds of space returning,
/// and SIGTERM on a full disk still exits promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_survived_and_recovered_from() {
    const ROWS: usize = 300;
    let w = World::with_options(SimOptions {
        latency: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let Some(disk) = SmallDisk::mount(&w.dir().join("small"), "16m") else {
        return;
    };
    let db = disk.dir.join("queue.db");
    let store = invoice_worker::store::Store::open_and_migrate(&db, Duration::from_secs(5))
        .await
        .expect("store on the small disk");
    for i in 0..ROWS {
        store
            .enqueue_rebill(&invoice_worker::store::admin::NewRebill {
                orderno: format!("FULL-{i:03}"),
                tax_num: TAX.into(),
                max_attempts: None,
                not_before: None,
            })
            .await
            .expect("insert");
    }
    let port = free_port();
    let old_db = w.config.database.path.display().to_string();
    let config = write_toml(
        &w,
        "disk.toml",
        |t| {
            t.replace(&old_db, &db.display().to_string())
                .replace("max_in_flight = 16", "max_in_flight = 8")
        },
        &format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let done = |store: &invoice_worker::store::Store| {
        let store = store.clone();
        async move {
            store
                .counts(QueueName::Rebill, now_ms())
                .await
                .map(|c| c.count("done"))
                .unwrap_or(-1)
        }
    };
    let mut daemon = Daemon::start(&config, w.dir().join("disk.log"));
    daemon.wait_running().await;
    wait_until(Duration::from_secs(30), "a first part drained", || async {
        done(&store).await >= 40
    })
    .await;

    // The disk fills up mid-drain.
    disk.fill();
    daemon
        .wait_for_log("database or disk is full", Duration::from_secs(30))
        .await;
    wait_until(
        Duration::from_secs(40),
        "/healthz to answer 503",
        || async {
            matches!(
                get(&client, &format!("{base}/healthz")).await,
                Some((503, _))
            )
        },
    )
    .await;
    let (_, why) = get(&client, &format!("{base}/healthz"))
        .await
        .expect("healthz");
    eprintln!("while full: /healthz said {why:?}");

    // Space returns: the daemon recovers by itself.
    disk.free();
    let freed = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "every row done after space returned",
        || async { done(&store).await == ROWS as i64 },
    )
    .await;
    let recovered = freed.elapsed();
    wait_until(
        Duration::from_secs(30),
        "/healthz to answer 200 again",
        || async {
            matches!(
                get(&client, &format!("{base}/healthz")).await,
                Some((200, _))
            )
        },
    )
    .await;
    eprintln!("full disk: all {ROWS} rows done {recovered:?} after space returned");
    assert!(
        recovered < Duration::from_secs(30),
        "recovery took {recovered:?}"
    );
    // Nothing marked done that the gateway did not accept.
    let verified = w.verified_ordernos();
    for row in store
        .list(QueueName::Rebill, Some("done"), ROWS as u32 + 10)
        .await
        .expect("list")
    {
        assert!(
            verified.contains(&row.order),
            "{} done but never accepted",
            row.order
        );
    }

    // SIGTERM on a full disk exits within shutdown_grace (5 s) plus a few seconds.
    for i in 0..400 {
        store
            .enqueue_rebill(&invoice_worker::store::admin::NewRebill {
                orderno: format!("FULL2-{i:03}"),
                tax_num: TAX.into(),
                max_attempts: None,
                not_before: None,
            })
            .await
            .expect("insert");
    }
    wait_until(
        Duration::from_secs(30),
        "the second batch under way",
        || async { done(&store).await >= ROWS as i64 + 5 },
    )
    .await;
    let full_before = daemon.log_text().matches("disk is full").count();
    disk.fill();
    wait_until(
        Duration::from_secs(30),
        "the daemon to meet the full disk again",
        || async { daemon.log_text().matches("disk is full").count() > full_before },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (took, log) = daemon.stop_with(
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(25),
        "SIGTERM on a full disk",
    );
    eprintln!("SIGTERM on a full disk: exited in {took:?}");
    assert!(took < Duration::from_secs(5 + 8), "exit took {took:?}");
    assert!(!log.contains("panicked"), "{log}");
    disk.free();
    let (check,): (String,) = {
        let mut conn = crate::common::other_connection(&db).await;
        sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .expect("integrity_check")
    };
    assert_eq!(check, "ok");
    store.close().await;
}
