//! Shared helpers for the integration tests: a simulator on port 0, a fresh database file,
//! a config pointing at both, the daemon in-process or as the real binary.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use invoice_worker::config::Config;
use invoice_worker::sim::{SimOptions, Simulator};
use invoice_worker::store::database::Location;
use invoice_worker::store::postgres::{cluster, PgConnect};
use invoice_worker::store::scratch::ScratchDatabase;
use invoice_worker::store::{Database, Store};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use tokio_util::sync::CancellationToken;

/// The seller tax number most tests use.
pub const TAX: &str = "91310117568051222X";

/// Defines `$name::sqlite` and `$name::postgres`, each running `async fn $name(Backend)`
/// of the enclosing module on a multi-threaded runtime (the PostgreSQL one returns at
/// once, after the cluster's loud line, where no server is installed outside CI).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
        }
    )*};
}

/// Which database a test world runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the world's directory.
    Sqlite,
    /// A database of its own on the test binary's throwaway PostgreSQL server.
    Postgres,
}

/// One test's world: a scratch database (closed before its directory goes), a simulator,
/// the daemon's store and a config.
pub struct World {
    pub sim: Simulator,
    /// The store the daemon runs on (either backend).
    pub database: Database,
    pub config: Config,
    /// A pool of its own on the database, as the other systems that insert rows have: the
    /// tests write and read the tables through it, never through the daemon's pool. Its
    /// SQL numbers placeholders `$1, $2, …` in order, which both backends read alike.
    pub writer: Writer,
    scratch: Scratch,
}

/// What a world removes when it ends.
enum Scratch {
    Sqlite(ScratchDatabase),
    /// The directory for configs and logs (the cluster's reaper removes the database).
    Postgres(tempfile::TempDir),
}

/// In-process daemons share the process-global metrics recorder: a test that reads the
/// metrics of its in-process daemon runs alone among them (the real binary has its own).
/// The lock is fair: a test must stop one in-process daemon before it starts the next.
static IN_PROCESS_METRICS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

impl World {
    pub async fn new() -> World {
        World::with_options(SimOptions::default()).await
    }

    pub async fn with_options(opts: SimOptions) -> World {
        World::on_with_options(Backend::Sqlite, opts)
            .await
            .expect("SQLite is always there")
    }

    /// A world on `backend`; `None` (after the cluster's one loud line) when PostgreSQL
    /// is not installed outside CI.
    pub async fn on(backend: Backend) -> Option<World> {
        World::on_with_options(backend, SimOptions::default()).await
    }

    /// [`World::on`] with simulator options.
    pub async fn on_with_options(backend: Backend, opts: SimOptions) -> Option<World> {
        match backend {
            Backend::Sqlite => Some(World::on_sqlite(opts).await),
            Backend::Postgres => Some(World::on_cluster(cluster::shared()?, opts).await),
        }
    }

    async fn on_sqlite(opts: SimOptions) -> World {
        let sim = Simulator::start(opts.clone()).await.expect("simulator");
        let db = ScratchDatabase::new(Duration::from_secs(5))
            .await
            .expect("store");
        let config = fast_config(&sim, &opts, &db.path());
        let writer = Writer::Sqlite(writer_pool(&db.path()).await);
        World {
            sim,
            database: db.store().clone().into(),
            config,
            writer,
            scratch: Scratch::Sqlite(db),
        }
    }

    /// A world on a new database of `cluster` (a test that restarts or stops its server
    /// brings a cluster of its own).
    pub async fn on_cluster(cluster: &cluster::ScratchCluster, opts: SimOptions) -> World {
        let sim = Simulator::start(opts.clone()).await.expect("simulator");
        let url = cluster.create_database().await.expect("a scratch database");
        let dir = tempfile::Builder::new()
            .prefix("invoice-worker-pg-world-")
            .tempdir()
            .expect("tempdir");
        let mut config = fast_config(&sim, &opts, &dir.path().join("unused.db"));
        config.database.url = Some(url.clone());
        let database = Database::open(&Location::Postgres(PgConnect::new(url.clone())))
            .await
            .expect("migrated PostgreSQL store");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("a pool of another writer");
        World {
            sim,
            database,
            config,
            writer: Writer::Postgres(pool),
            scratch: Scratch::Postgres(dir),
        }
    }

    /// The SQLite store, for tests of what only SQLite has (its file, WAL, query plans).
    pub fn store(&self) -> &Store {
        self.database
            .as_sqlite()
            .expect("a SQLite-only test on a PostgreSQL world")
    }

    /// The writer's SQLite pool, for tests of what only SQLite has.
    pub fn sql(&self) -> &SqlitePool {
        match &self.writer {
            Writer::Sqlite(pool) => pool,
            Writer::Postgres(_) => panic!("a SQLite-only test on a PostgreSQL world"),
        }
    }

    /// The test's temporary directory (on SQLite the database is `queue.db` in it).
    pub fn dir(&self) -> &Path {
        match &self.scratch {
            Scratch::Sqlite(db) => db.dir(),
            Scratch::Postgres(dir) => dir.path(),
        }
    }

    /// Starts the daemon in this process; cancel the token (or call `stop`) to end it.
    pub async fn start(&self) -> RunningDaemon {
        let metrics = MetricsTurn::Shared(IN_PROCESS_METRICS.read().await);
        self.start_holding(metrics)
    }

    /// Starts the daemon in this process as the only in-process daemon writing metrics, for
    /// a test that reads them.
    pub async fn start_alone_with_metrics(&self) -> RunningDaemon {
        let metrics = MetricsTurn::Alone(IN_PROCESS_METRICS.write().await);
        self.start_holding(metrics)
    }

    /// Starts the daemon in this process on a host whose clock reads `clock`.
    pub async fn start_on_clock(&self, clock: invoice_worker::clock::Clock) -> RunningDaemon {
        let metrics = MetricsTurn::Shared(IN_PROCESS_METRICS.read().await);
        self.start_holding_on(metrics, clock)
    }

    fn start_holding(&self, metrics: MetricsTurn) -> RunningDaemon {
        self.start_holding_on(metrics, invoice_worker::clock::Clock::system())
    }

    fn start_holding_on(
        &self,
        metrics: MetricsTurn,
        clock: invoice_worker::clock::Clock,
    ) -> RunningDaemon {
        let token = CancellationToken::new();
        let (config, store, stop) = (self.config.clone(), self.database.clone(), token.clone());
        let handle = tokio::spawn(async move {
            invoice_worker::daemon::run_on_clock(&config, store, stop, clock).await
        });
        RunningDaemon {
            token,
            handle,
            _metrics: metrics,
        }
    }

    /// Writes the config as TOML (secrets inline) for the real binary.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir().join("worker.toml");
        std::fs::write(&path, config_toml(&self.config, &SimOptions::default()))
            .expect("write config");
        path
    }

    pub async fn status_of(&self, table: &str, id: i64) -> String {
        let rows: Vec<(String,)> = self
            .writer
            .rows(
                &format!("SELECT status FROM {table} WHERE id = $1"),
                &[Arg::Int(id)],
            )
            .await;
        rows.into_iter().next().expect("row").0
    }

    /// Waits until none of `ids` in `table` is pending or running.
    pub async fn wait_finished(&self, table: &str, ids: &[i64]) {
        wait_until(Duration::from_secs(20), "rows to finish", || async {
            for id in ids {
                let s = self.status_of(table, *id).await;
                if s == "pending" || s == "running" {
                    return false;
                }
            }
            true
        })
        .await;
    }

    pub async fn insert_rebill(&self, orderno: &str, tax_num: &str) -> i64 {
        self.writer
            .insert_id(
                "INSERT INTO rebill_orders (orderno, tax_num) VALUES ($1, $2) RETURNING id",
                &[Arg::text(orderno), Arg::text(tax_num)],
            )
            .await
    }

    /// Claims up to 10 due rebill rows at `now` as daemon `daemon` would, under `token` with
    /// `lease` (another daemon's claim, as the tests play it).
    pub async fn claim_rebill_as(
        &self,
        now: i64,
        lease: Duration,
        token: &str,
        daemon: &str,
    ) -> invoice_worker::store::claim::ClaimBatch<invoice_worker::store::rows::RebillRow> {
        let params = invoice_worker::store::claim::ClaimParams {
            now,
            limit: 10,
            lease,
            claim_token: token,
            claimed_by: daemon,
        };
        use invoice_worker::store::driver::QueueStore as _;
        self.database
            .claim(&params, |_| {
                invoice_worker::store::pauses::ClaimPlan::unpaused()
            })
            .await
            .expect("claim")
    }

    /// Order numbers of the rebill requests the simulator accepted as correctly signed.
    pub fn verified_ordernos(&self) -> std::collections::HashSet<String> {
        self.sim
            .rebill_requests()
            .into_iter()
            .filter(|r| r.verified)
            .map(|r| r.orderno)
            .collect()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.writer.count(sql).await
    }
}

/// A value bound to a writer's placeholder.
#[derive(Debug, Clone)]
pub enum Arg {
    Text(String),
    Int(i64),
}

impl Arg {
    pub fn text(s: &str) -> Arg {
        Arg::Text(s.to_string())
    }
}

/// Another system's connection pool on the world's database.
#[derive(Clone)]
pub enum Writer {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// `args` in order as either backend's query arguments.
fn arguments<'q, DB: sqlx::Database>(args: &[Arg]) -> <DB as sqlx::Database>::Arguments<'q>
where
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    use sqlx::Arguments as _;
    let mut bound = <DB as sqlx::Database>::Arguments::<'q>::default();
    for arg in args {
        match arg.clone() {
            Arg::Text(text) => bound.add(text),
            Arg::Int(n) => bound.add(n),
        }
        .expect("a text or integer argument encodes");
    }
    bound
}

impl Writer {
    /// Runs one statement; rows affected.
    pub async fn execute(&self, sql: &str, args: &[Arg]) -> u64 {
        self.try_execute(sql, args)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs one statement; rows affected, or the database's error.
    pub async fn try_execute(&self, sql: &str, args: &[Arg]) -> Result<u64, sqlx::Error> {
        match self {
            Writer::Sqlite(pool) => sqlx::query_with(sql, arguments::<sqlx::Sqlite>(args))
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            Writer::Postgres(pool) => sqlx::query_with(sql, arguments::<sqlx::Postgres>(args))
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        }
    }

    /// Runs an `INSERT … RETURNING id`; the id.
    pub async fn insert_id(&self, sql: &str, args: &[Arg]) -> i64 {
        let rows: Vec<(i64,)> = self.rows(sql, args).await;
        rows.first().expect("RETURNING id").0
    }

    /// The rows of a query.
    pub async fn rows<T>(&self, sql: &str, args: &[Arg]) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        match self {
            Writer::Sqlite(pool) => {
                sqlx::query_as_with::<_, T, _>(sql, arguments::<sqlx::Sqlite>(args))
                    .fetch_all(pool)
                    .await
            }
            Writer::Postgres(pool) => {
                sqlx::query_as_with::<_, T, _>(sql, arguments::<sqlx::Postgres>(args))
                    .fetch_all(pool)
                    .await
            }
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A single count.
    pub async fn count(&self, sql: &str) -> i64 {
        let rows: Vec<(i64,)> = self.rows(sql, &[]).await;
        rows.first().expect("a count").0
    }

    /// Inserts rebill rows of `tax_num`, a few hundred per statement (a bulk writer).
    pub async fn insert_rebills(&self, ordernos: &[String], tax_num: &str) {
        for chunk in ordernos.chunks(400) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                .collect();
            let args: Vec<Arg> = chunk
                .iter()
                .flat_map(|o| [Arg::text(o), Arg::text(tax_num)])
                .collect();
            let sql = format!(
                "INSERT INTO rebill_orders (orderno, tax_num) VALUES {}",
                values.join(", ")
            );
            self.execute(&sql, &args).await;
        }
    }
}

pub struct RunningDaemon {
    pub token: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    _metrics: MetricsTurn,
}

/// The guard a running in-process daemon holds on the metrics recorder.
enum MetricsTurn {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>),
}

impl RunningDaemon {
    pub async fn stop(self) {
        self.token.cancel();
        self.handle
            .await
            .expect("daemon task")
            .expect("daemon result");
    }
}

/// A config tuned for tests: short delays, loopback simulator, credentials that match it.
pub fn fast_config(sim: &Simulator, opts: &SimOptions, db: &Path) -> Config {
    let mut c = invoice_worker::sim::config_for(sim, opts, db);
    c.worker.lease = Duration::from_secs(3);
    c.worker.poll_interval = Duration::from_millis(20);
    c.worker.shutdown_grace = Duration::from_secs(5);
    c.retry.base_delay = Duration::from_millis(100);
    c.retry.max_delay = Duration::from_millis(400);
    c.rebill.limits.timeout = Duration::from_secs(2);
    c.rebill.limits.rate_per_second = 1000;
    c.rebill.limits.max_in_flight = 16;
    c.title.sqm = Some("TEST-SQM".into());
    c.title.limits.timeout = Duration::from_secs(2);
    c.title.limits.rate_per_second = 1000;
    c.validate().expect("test config is valid");
    c
}

/// The config as a TOML file the binary reads, secrets inline.
/// The `[database]` key that points a config at `c`'s database, either backend.
pub fn database_line(c: &Config) -> String {
    match &c.database.url {
        Some(url) => format!("url = \"{url}\""),
        None => format!("path = \"{}\"", c.database.path.display()),
    }
}

pub fn config_toml(c: &Config, opts: &SimOptions) -> String {
    let base = c.title.base_url.clone().unwrap_or_default();
    format!(
        r#"[database]
{db}

[worker]
lease = "{lease}ms"
poll_interval = "20ms"
shutdown_grace = "{grace}ms"

[retry]
base_delay = "{base}ms"
max_delay = "{max}ms"

[rebill]
endpoint = "{endpoint}"
appid = "{appid}"
app_secret = "{secret}"
timeout = "{timeout}ms"
rate_per_second = 1000
max_in_flight = {inflight}

[title]
base_url = "{base_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
sqm = "TEST-SQM"
rate_per_second = 1000

[housekeeping]
enabled = false
"#,
        db = database_line(c),
        lease = c.worker.lease.as_millis(),
        grace = c.worker.shutdown_grace.as_millis(),
        base = c.retry.base_delay.as_millis(),
        max = c.retry.max_delay.as_millis(),
        endpoint = c.rebill.endpoint,
        appid = opts.rebill_appid,
        secret = opts.rebill_secret,
        timeout = c.rebill.limits.timeout.as_millis(),
        inflight = c.rebill.limits.max_in_flight,
        base_url = base,
        client_id = opts.title_client_id,
        client_secret = opts.title_client_secret,
    )
}

/// Another process's transaction that keeps the daemon's claims of the rebill queue
/// waiting until [`WriteLock::release`]: SQLite's write lock (`BEGIN EXCLUSIVE`), or on
/// PostgreSQL an `ACCESS EXCLUSIVE` lock on `rebill_orders`, which even reads wait for.
pub enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    /// Takes the lock on `w`'s database.
    pub async fn take(w: &World) -> WriteLock {
        use sqlx::Connection;
        match &w.config.database.url {
            None => {
                let mut conn = other_connection(&w.config.database.path).await;
                sqlx::query("BEGIN EXCLUSIVE")
                    .execute(&mut conn)
                    .await
                    .expect("BEGIN EXCLUSIVE");
                WriteLock::Sqlite(conn)
            }
            Some(url) => {
                let mut conn = sqlx::PgConnection::connect(url)
                    .await
                    .expect("a connection of its own");
                sqlx::query("BEGIN")
                    .execute(&mut conn)
                    .await
                    .expect("BEGIN");
                sqlx::query("LOCK TABLE rebill_orders IN ACCESS EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .expect("LOCK TABLE");
                WriteLock::Postgres(conn)
            }
        }
    }

    /// Ends the transaction: the daemon's claims go on.
    pub async fn release(self) {
        match self {
            WriteLock::Sqlite(mut conn) => {
                sqlx::query("COMMIT")
                    .execute(&mut conn)
                    .await
                    .expect("COMMIT");
            }
            WriteLock::Postgres(mut conn) => {
                sqlx::query("COMMIT")
                    .execute(&mut conn)
                    .await
                    .expect("COMMIT");
            }
        }
    }
}

/// A connection of its own to the database at `db`, as another process's writer has (a
/// busy timeout, no pool, none of the daemon's pragmas).
pub async fn other_connection(db: &Path) -> sqlx::SqliteConnection {
    use sqlx::ConnectOptions;
    sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("a connection of another writer")
}

/// A small pool on the database at `db` opened the way another system's writer opens it.
pub async fn writer_pool(db: &Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(db)
                .busy_timeout(Duration::from_secs(5)),
        )
        .await
        .expect("a pool of another writer")
}

/// Polls `check` until it is true or `limit` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real binary.
pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_invoice-worker"))
}

pub fn send_signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).expect("kill");
}

/// Waits for a child to exit, up to `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Environment variables that would change what the binary reads (config, secrets, log
/// level, the systemd notify socket and watchdog).
pub const SCRUBBED_ENV: [&str; 8] = [
    "RUST_LOG",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOICE_WORKER_CONFIG",
    "INVOICE_WORKER_REBILL_APP_SECRET",
    "INVOICE_WORKER_TITLE_CLIENT_SECRET",
    "INVOICE_WORKER_DATABASE_PASSWORD",
];

/// The binary with every variable of [`SCRUBBED_ENV`] removed and stdin closed.
pub fn scrubbed_binary() -> Command {
    let mut cmd = binary();
    cmd.stdin(Stdio::null());
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// A daemon process (`run --config PATH`, stderr in `log`), SIGKILLed if the test ends
/// (or panics) while it still runs.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// The real binary with a clean environment.
    pub fn start(config: &Path, log: PathBuf) -> Daemon {
        Daemon::start_with(binary(), config, log, &[])
    }

    /// Like `start`, plus the variables `env`.
    pub fn start_env(config: &Path, log: PathBuf, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(binary(), config, log, env)
    }

    /// Runs `command run --config PATH` with [`SCRUBBED_ENV`] removed and `env` added.
    pub fn start_with(
        mut command: Command,
        config: &Path,
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Daemon {
        let stderr = std::fs::File::create(&log).expect("log file");
        command.args(["run", "--config"]).arg(config);
        for var in SCRUBBED_ENV {
            command.env_remove(var);
        }
        command.envs(env.iter().copied());
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn daemon");
        Daemon { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        send_signal(&self.child, signal);
    }

    /// The exit status, which must come within `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        wait_exit(&mut self.child, limit)
    }

    /// Asserts that the daemon exited with `code` (showing its log otherwise); the log.
    pub fn assert_exit(&self, status: std::process::ExitStatus, code: i32, what: &str) -> String {
        let log = self.log_text();
        assert_eq!(
            status.code(),
            Some(code),
            "{what}: exit status {status:?}; log:\n{log}"
        );
        log
    }

    /// Sends `signal` and asserts a clean exit (code 0) within `limit`: how long the exit
    /// took after the signal, and the log.
    pub fn stop_with(
        &mut self,
        signal: nix::sys::signal::Signal,
        limit: Duration,
        what: &str,
    ) -> (Duration, String) {
        let signalled = Instant::now();
        self.signal(signal);
        let status = self.wait(limit);
        let took = signalled.elapsed();
        (took, self.assert_exit(status, 0, what))
    }

    /// SIGTERM and a clean exit within `limit`; the log.
    pub fn stop(&mut self, limit: Duration, what: &str) -> String {
        self.stop_with(nix::sys::signal::Signal::SIGTERM, limit, what)
            .1
    }

    /// SIGKILL; asserts the signal (not an exit code) ended the process.
    pub fn kill_9(&mut self, what: &str) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let status = self.wait(Duration::from_secs(5));
        assert_eq!(
            status.code(),
            None,
            "{what}: daemon was not killed by the signal: {status:?}"
        );
    }

    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "daemon log never showed {needle:?} within {limit:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to 15 s) for the startup line.
    pub async fn wait_running(&self) {
        self.wait_for_log("invoice-worker running", Duration::from_secs(15))
            .await;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port that was free a moment ago (the daemon's `[http] listen` cannot be port 0: the
/// test would not know where to connect).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}
