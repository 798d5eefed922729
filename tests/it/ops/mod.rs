//! Operations, one module per concern: the systemd notify protocol and watchdog (`notify`),
//! `/metrics` and `/healthz` (`metrics`), log formats (`logs`), a full disk (`disk`). This
//! module holds their shared helpers: a fake service manager, metrics scraping, configs.
//!
//! The metrics recorder is process-global: the test that scrapes an in-process daemon
//! starts it with `World::start_alone_with_metrics`, and assumes no counter starts at zero.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::common::{
    config_toml, free_port, wait_until, Arg, Backend, Daemon, World, WriteLock, TAX,
};
use invoice_worker::sim::SimOptions;
use invoice_worker::store::{now_ms, QueueName};

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
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; last scrape:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

mod disk;
mod logs;
mod metrics;
mod notify;
