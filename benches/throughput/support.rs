//! Helpers the sections share: the benchmark's config, its own connections on the database
//! file, inserting pending rows, the in-process daemon, CPU accounting over a window, and
//! starting the real binary as a child process.
//!
//! The benchmark never uses the store's pool: raw SQL (inserts, counts, updates) goes
//! through connections opened here on the database file, the way another process inserting
//! or watching rows would, so what is measured is the store as the daemon uses it.

use invoice_worker::store::claim::{ClaimBatch, ClaimParams};
use invoice_worker::store::driver::QueueStore;
use invoice_worker::store::pauses::ClaimPlan;
use invoice_worker::store::rows::RebillRow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use invoice_worker::config::Config;
use invoice_worker::sim::{SimOptions, Simulator};
use invoice_worker::store::{Database, Store};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use tokio_util::sync::CancellationToken;

pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A valid seller tax number (the simulator and the validator accept it).
pub const TAX: &str = "91310117568051222X";

// ---------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------

/// A config like the integration tests' `fast_config`, with the given limits.
pub fn bench_config(
    sim: &Simulator,
    opts: &SimOptions,
    db: &Path,
    max_in_flight: u32,
    rate: u32,
    claim_batch: u32,
) -> BenchResult<Config> {
    let mut c = invoice_worker::sim::config_for(sim, opts, db);
    c.worker.lease = Duration::from_secs(30);
    c.worker.claim_batch = claim_batch;
    c.worker.shutdown_grace = Duration::from_secs(5);
    c.retry.base_delay = Duration::from_millis(100);
    c.retry.max_delay = Duration::from_millis(400);
    c.rebill.limits.timeout = Duration::from_secs(5);
    c.rebill.limits.rate_per_second = rate;
    c.rebill.limits.max_in_flight = max_in_flight;
    c.title.sqm = Some("TEST-SQM".into());
    c.title.limits.timeout = Duration::from_secs(5);
    c.validate()?;
    Ok(c)
}

pub fn describe_config(c: &Config) -> String {
    format!(
        "max_in_flight={} rate_per_second={} claim_batch={} poll_interval={:?} lease={:?} history={} (title queue enabled, empty)",
        c.rebill.limits.max_in_flight, c.rebill.limits.rate_per_second, c.worker.claim_batch, c.worker.poll_interval, c.worker.lease, c.worker.history
    )
}

// ---------------------------------------------------------------------------------------
// Connections of the benchmark's own
// ---------------------------------------------------------------------------------------

fn own_connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
}

/// A connection of its own, as another process inserting rows or watching would have.
pub async fn observer(path: &Path) -> BenchResult<SqliteConnection> {
    Ok(own_connect_options(path).connect().await?)
}

/// Like [`observer`], for the benchmark's bulk writes (setting up rows, putting claimed
/// rows back). Its commits never checkpoint (`wal_autocheckpoint = 0`, as on the store's
/// own connections), so the WAL the store then works with is what the benchmark always
/// left it: checkpoints happen where a section asks for one, not as a side effect of
/// preparing the data.
pub async fn writer(path: &Path) -> BenchResult<SqliteConnection> {
    Ok(own_connect_options(path)
        .pragma("wal_autocheckpoint", "0")
        .connect()
        .await?)
}

/// Inserts `n` pending rebill rows (`{prefix}{i}`) in one statement, one transaction.
pub async fn insert_pending(conn: &mut SqliteConnection, prefix: &str, n: u64) -> BenchResult<()> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "INSERT INTO rebill_orders (orderno, tax_num) \
         WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
         SELECT ?2 || i, ?3 FROM s",
    )
    .bind(n as i64)
    .bind(prefix)
    .bind(TAX)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// [`insert_pending`] on a [`writer`] connection of its own, closed afterwards.
pub async fn insert_pending_into(path: &Path, prefix: &str, n: u64) -> BenchResult<()> {
    let mut conn = writer(path).await?;
    insert_pending(&mut conn, prefix, n).await?;
    conn.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The in-process daemon
// ---------------------------------------------------------------------------------------

pub struct RunningDaemon {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub fn start_daemon(config: &Config, store: &Store) -> RunningDaemon {
    start_daemon_on(config, store.clone().into())
}

/// The daemon in this process on `store`, either backend.
pub fn start_daemon_on(config: &Config, store: Database) -> RunningDaemon {
    let token = CancellationToken::new();
    let (config, stop) = (config.clone(), token.clone());
    let handle =
        tokio::spawn(
            async move { invoice_worker::daemon::run_with_store(&config, store, stop).await },
        );
    RunningDaemon { token, handle }
}

impl RunningDaemon {
    pub async fn stop(self) -> BenchResult<()> {
        self.token.cancel();
        match self.handle.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("daemon returned an error: {e:#}").into()),
            Err(e) => Err(format!("daemon task failed: {e}").into()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// CPU accounting
// ---------------------------------------------------------------------------------------

/// CPU used by this process and by the whole machine over a window, to tell the
/// benchmark's own cost from other load on the (shared) machine.
pub struct CpuWindow {
    at: Instant,
    own_ticks: u64,
    machine_busy: u64,
}

pub struct CpuUse {
    pub wall: f64,
    /// Cores this process kept busy on average.
    pub own_cores: f64,
    /// Cores the whole machine kept busy on average (this process included).
    pub machine_cores: f64,
}

impl CpuUse {
    /// CPU time of this process per unit of work, µs.
    pub fn own_us_per(&self, units: u64) -> f64 {
        self.own_cores * self.wall * 1e6 / units.max(1) as f64
    }

    pub fn describe(&self) -> String {
        format!(
            "this process used {:.2} cores on average, the whole machine {:.2} (others {:.2})",
            self.own_cores,
            self.machine_cores,
            (self.machine_cores - self.own_cores).max(0.0)
        )
    }
}

fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    total.saturating_sub(idle)
}

impl CpuWindow {
    pub fn start() -> CpuWindow {
        CpuWindow {
            at: Instant::now(),
            own_ticks: cpu_sample("self").map(|s| s.ticks).unwrap_or(0),
            machine_busy: machine_busy_ticks(),
        }
    }

    pub fn finish(&self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64();
        let hz = clock_ticks();
        let own = cpu_sample("self")
            .map(|s| s.ticks)
            .unwrap_or(0)
            .saturating_sub(self.own_ticks);
        let machine = machine_busy_ticks().saturating_sub(self.machine_busy);
        CpuUse {
            wall,
            own_cores: own as f64 / hz / wall,
            machine_cores: machine as f64 / hz / wall,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pub at: Instant,
    /// utime + stime from /proc/<pid>/stat, clock ticks.
    pub ticks: u64,
    /// Sum of per-thread run time from /proc/<pid>/task/*/schedstat, ns.
    pub sched_ns: u64,
}

pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

pub fn cpu_sample(pid: &str) -> BenchResult<CpuSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, a)| a)
        .ok_or("malformed stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    let utime: u64 = fields.get(11).ok_or("stat too short")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("stat too short")?.parse()?;
    let mut sched_ns = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            sched_ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(CpuSample {
        at: Instant::now(),
        ticks: utime + stime,
        sched_ns,
    })
}

// ---------------------------------------------------------------------------------------
// The real binary as a child process
// ---------------------------------------------------------------------------------------

pub fn binary_path() -> Option<PathBuf> {
    let candidates = [
        option_env!("CARGO_BIN_EXE_invoice-worker").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/invoice-worker")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

fn config_toml(c: &Config, opts: &SimOptions) -> String {
    format!(
        r#"[database]
{db}

[worker]
poll_interval = "{poll}ms"

[rebill]
endpoint = "{endpoint}"
appid = "{appid}"
app_secret = "{secret}"

[title]
base_url = "{base_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
sqm = "TEST-SQM"

[log]
level = "info"
"#,
        db = match &c.database.url {
            Some(url) => format!("url = \"{url}\""),
            None => format!("path = \"{}\"", c.database.path.display()),
        },
        poll = c.worker.poll_interval.as_millis(),
        endpoint = c.rebill.endpoint,
        appid = opts.rebill_appid,
        secret = opts.rebill_secret,
        base_url = c.title.base_url.clone().unwrap_or_default(),
        client_id = opts.title_client_id,
        client_secret = opts.title_client_secret,
    )
}

/// The running child; SIGTERMed (then killed after 10 s) when dropped.
pub struct ChildGuard(pub Child);

/// Starts the real binary on `config` (written to `dir`, log at info to a file in `dir`)
/// and waits until it reports running. SIGTERMed when the guard drops.
pub async fn start_binary(
    bin: &Path,
    dir: &Path,
    config: &Config,
    opts: &SimOptions,
) -> BenchResult<(ChildGuard, PathBuf)> {
    let toml_path = dir.join("worker.toml");
    std::fs::write(&toml_path, config_toml(config, opts))?;
    std::fs::set_permissions(
        &toml_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let log_path = dir.join("child.log");
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&toml_path)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove(invoice_worker::config::ENV_REBILL_SECRET)
        .env_remove(invoice_worker::config::ENV_TITLE_SECRET)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let mut child = ChildGuard(child);
    wait_until_running(&mut child, &log_path).await?;
    Ok((child, log_path))
}

/// Polls the child's log for the "running" line (20 s at most).
async fn wait_until_running(child: &mut ChildGuard, log_path: &Path) -> BenchResult<()> {
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if log.contains("invoice-worker running") {
            return Ok(());
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            return Err(format!("daemon exited during startup ({status}); log:\n{log}").into());
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err(format!("daemon did not report running within 20 s; log:\n{log}").into());
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Claims up to `limit` due rebill rows under `token` (a 30 s lease), as the worker does on
/// a queue without pauses.
pub async fn claim_rebill<S: QueueStore>(
    store: &S,
    token: &str,
    limit: u32,
) -> BenchResult<ClaimBatch<RebillRow>> {
    let params = ClaimParams {
        now: invoice_worker::store::now_ms(),
        limit,
        lease: Duration::from_secs(30),
        claim_token: token,
        claimed_by: "bench",
    };
    Ok(QueueStore::claim(store, &params, |_| ClaimPlan::unpaused()).await?)
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}
