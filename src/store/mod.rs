//! The SQLite store: the pool, pragmas, migrations and every SQL statement the worker runs
//! (each queue's built once, in `sql`), the pause primitives the queue's pause policy uses,
//! and the store's own background services (the commit watcher and the WAL keeper). It
//! decides nothing about retries and makes no HTTP calls; another backend would replace
//! this module alone.

pub mod admin;
pub mod claim;
pub mod complete;
#[cfg(test)]
mod conformance;
pub mod database;
pub use database::Database;
pub mod driver;
pub mod history;
pub mod housekeeping;
pub mod leases;
pub mod outbox;
pub mod page;
pub mod pauses;
pub mod postgres;
pub mod rows;
pub mod scratch;
pub mod services;
pub mod show;
mod sql;
pub mod wal;
pub mod watch;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Connection as _;

/// The default size the `-wal` file is kept under: 16 MiB.
pub const DEFAULT_WAL_LIMIT: u64 = 16 * 1024 * 1024;

/// The embedded SQLite migrations (`migrations/sqlite/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Which queue a statement is about. The two tables share their bookkeeping columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueName {
    /// `rebill_orders`, drained to fw199 `rebillingnew`.
    Rebill,
    /// `title_submissions`, drained to 开票精灵 FPTT1001.
    Title,
}

impl QueueName {
    /// Both queues, in display order.
    pub const ALL: [QueueName; 2] = [QueueName::Rebill, QueueName::Title];

    /// The name used in logs, metrics, the CLI and the `pauses` table.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::Rebill => "rebill",
            QueueName::Title => "title",
        }
    }

    /// The table holding this queue's rows.
    pub fn table(self) -> &'static str {
        match self {
            QueueName::Rebill => "rebill_orders",
            QueueName::Title => "title_submissions",
        }
    }

    /// The SQL expression naming a row's seller, the key of seller pauses: the tax number
    /// for rebilling, the 开票精灵 authorisation code (empty = the configured default) for
    /// titles (`(default)` for rows using the configured code).
    pub(crate) fn seller_expr(self) -> &'static str {
        match self {
            QueueName::Rebill => "tax_num",
            QueueName::Title => "COALESCE(NULLIF(sqm, ''), '(default)')",
        }
    }

    /// The column that identifies a row to a person (`orderno`, `order_no`).
    pub(crate) fn order_column(self) -> &'static str {
        match self {
            QueueName::Rebill => "orderno",
            QueueName::Title => "order_no",
        }
    }
}

impl FromStr for QueueName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rebill" => Ok(QueueName::Rebill),
            "title" => Ok(QueueName::Title),
            other => Err(format!("unknown queue {other:?}: expected rebill or title")),
        }
    }
}

/// One value per queue (each backend's statements, built once per queue).
#[derive(Debug)]
pub(crate) struct PerQueue<T> {
    rebill: T,
    title: T,
}

impl<T> PerQueue<T> {
    /// Builds the value of each queue.
    pub fn new(build: impl Fn(QueueName) -> T) -> PerQueue<T> {
        PerQueue {
            rebill: build(QueueName::Rebill),
            title: build(QueueName::Title),
        }
    }

    /// The value of `queue`.
    pub fn of(&self, queue: QueueName) -> &T {
        match queue {
            QueueName::Rebill => &self.rebill,
            QueueName::Title => &self.title,
        }
    }
}

/// Failures of the store. Callers branch on [`StoreError::Constraint`] (a writer's mistake).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused a value (CHECK, UNIQUE, NOT NULL).
    #[error("refused by the database: {0}")]
    Constraint(String),
    /// Anything else SQLite reported.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The PostgreSQL server could not be reached or refused the login (the URL shown is
    /// scrubbed of its password).
    #[error("cannot connect to [database] url {url}: {reason}")]
    Connect {
        /// `[database] url` without its password.
        url: String,
        /// Why, scrubbed of the password too.
        reason: String,
        /// The server refused the credentials (a wrong password or user).
        auth: bool,
    },
    /// The database file could not be created.
    #[error("cannot create database file {path}: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A database file's mode could not be set (`[database] group_writable`).
    #[error("cannot give {path} mode {mode:o} ([database] group_writable): {source}")]
    Mode {
        /// The file.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// Why.
        source: std::io::Error,
    },
}

impl StoreError {
    /// True when another connection held the write lock for longer than the busy timeout
    /// (writers of other processes inserting back to back can starve a waiter: SQLite's
    /// busy handler polls with sleeps, it does not queue). Worth retrying at once.
    pub fn is_busy(&self) -> bool {
        matches!(self, StoreError::Sqlx(e) if is_busy(e))
    }

    /// Sorts constraint violations from other failures.
    pub(crate) fn classify(error: sqlx::Error) -> StoreError {
        if let sqlx::Error::Database(db) = &error {
            if db.is_unique_violation()
                || db.is_check_violation()
                || db.kind() == sqlx::error::ErrorKind::NotNullViolation
            {
                return StoreError::Constraint(db.message().to_string());
            }
        }
        StoreError::Sqlx(error)
    }
}

/// The system's time in Unix epoch milliseconds, the unit of every time column (for the
/// command line and the tests; the queue machinery takes a [`crate::clock::Clock`]).
pub use crate::clock::system_now_ms as now_ms;

/// A handle on the queue database, cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
    busy_timeout: Duration,
    wal_limit: u64,
    /// Serialises this process's write transactions. SQLite allows one writer at a time;
    /// without the gate, writers of this process meet SQLite's busy handler, which sleeps in
    /// steps of milliseconds and leaves the lock idle. Queued here they hand over at once.
    /// Other processes are still covered by the busy timeout.
    write_gate: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Every per-queue statement's text, built once.
    statements: std::sync::Arc<PerQueue<sql::QueueSql>>,
    /// Whether pauses started and lifted raise alerts (`outbox`).
    alerts: bool,
    /// Whether attempts are recorded in the history (`history`).
    history: bool,
}

impl Store {
    /// Opens (creating with mode 0600 if missing) the database file, in WAL mode with a
    /// busy timeout and the default WAL size limit. Does not migrate.
    pub async fn open(path: &Path, busy_timeout: Duration) -> Result<Store, StoreError> {
        Store::open_limited(path, busy_timeout, DEFAULT_WAL_LIMIT).await
    }

    /// Opens and migrates the database `[database]` describes, its files in the mode it
    /// asks for.
    pub async fn open_configured(
        database: &crate::config::DatabaseConfig,
    ) -> Result<Store, StoreError> {
        let limit = database.wal_limit.as_u64();
        let mode = FileMode::of(database.group_writable);
        let store =
            Store::open_with_mode(&database.path, database.busy_timeout, limit, mode).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Like [`Store::open`], keeping the `-wal` file under `wal_limit` bytes (see
    /// [`services`]).
    pub async fn open_limited(
        path: &Path,
        busy_timeout: Duration,
        wal_limit: u64,
    ) -> Result<Store, StoreError> {
        Store::open_with_mode(path, busy_timeout, wal_limit, FileMode::Private).await
    }

    /// Like [`Store::open_limited`], with the database files in `mode`.
    pub async fn open_with_mode(
        path: &Path,
        busy_timeout: Duration,
        wal_limit: u64,
        mode: FileMode,
    ) -> Result<Store, StoreError> {
        create_file(path, mode)?;
        set_file_modes(path, mode)?;
        ensure_wal(path, busy_timeout).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // A connection whose transaction state is unknown is closed, not reused. On a full
            // disk SQLite rolls a transaction back by itself; the ROLLBACK that follows then
            // fails and sqlx still counts the connection as inside a transaction, so every
            // later BEGIN on it would fail ("non-zero transaction depth") for ever.
            .after_release(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
            // No ping before each use: an in-process SQLite connection does not drop like a
            // network one, and the ping was a second round trip to the connection's thread
            // for every statement (the hook below covers the one way one goes bad).
            .test_before_acquire(false)
            .before_acquire(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
            .connect_with(
                connect_options(path, busy_timeout)
                    // A WAL reset after a checkpoint truncates the file back to this size.
                    .pragma("journal_size_limit", wal_limit.to_string()),
            )
            .await?;
        Ok(Store {
            pool,
            path: path.to_path_buf(),
            busy_timeout,
            wal_limit,
            write_gate: std::sync::Arc::default(),
            statements: std::sync::Arc::new(PerQueue::new(sql::QueueSql::new)),
            alerts: false,
            history: true,
        })
    }

    /// Opens and applies the embedded migrations.
    pub async fn open_and_migrate(
        path: &Path,
        busy_timeout: Duration,
    ) -> Result<Store, StoreError> {
        let store = Store::open(path, busy_timeout).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the embedded migrations (idempotent). Two processes migrating the same new
    /// file at once (two daemons, a daemon and the CLI) both see a migration missing; the
    /// loser's transaction fails on the winner's row and rolls back, and looking again
    /// finds everything applied. So such a failure is retried a few times.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut pause = Duration::from_millis(10);
        for _ in 0..6 {
            match MIGRATOR.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(e) if lost_a_migration_race(&e) => {
                    tokio::time::sleep(pause + Duration::from_millis(rand::random_range(0..10)))
                        .await;
                    pause *= 2;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(MIGRATOR.run(&self.pool).await?)
    }

    /// The underlying pool, for this module's statements and the crate's unit tests.
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// `queue`'s statements.
    pub(crate) fn sql(&self, queue: QueueName) -> &sql::QueueSql {
        self.statements.of(queue)
    }

    /// Runs `sql` (a checkpoint) on one pooled connection in this process's turn to write,
    /// waiting at most `busy` for other processes instead of the busy timeout: it holds up
    /// this process's writers meanwhile.
    pub(crate) async fn in_turn_briefly(
        &self,
        sql: &str,
        busy: Duration,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let mut conn = self.pool.acquire().await?;
        sqlx::query(&format!("PRAGMA busy_timeout = {}", busy.as_millis()))
            .execute(&mut *conn)
            .await?;
        let result = sqlx::query(sql).execute(&mut *conn).await;
        let restored = sqlx::query(&format!(
            "PRAGMA busy_timeout = {}",
            self.busy_timeout.as_millis()
        ))
        .execute(&mut *conn)
        .await;
        if restored.is_err() {
            // Never hand a connection with the short timeout back to the pool.
            conn.detach();
        }
        result?;
        Ok(())
    }

    /// Waits for this process's turn to write (see `write_gate`).
    pub(crate) async fn write_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write_gate.lock().await
    }

    /// Starts a `BEGIN IMMEDIATE` transaction in this process's turn to write. The turn is
    /// held until the returned guard drops, after the commit.
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, ()>,
            sqlx::Transaction<'static, sqlx::Sqlite>,
        ),
        StoreError,
    > {
        let turn = self.write_turn().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok((turn, tx))
    }

    /// Size of the `-wal` file in bytes (0 when absent).
    pub fn wal_size(&self) -> u64 {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        std::fs::metadata(wal).map_or(0, |m| m.len())
    }

    /// The size the `-wal` file is kept under, in bytes.
    pub fn wal_limit(&self) -> u64 {
        self.wal_limit
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh connection outside the pool, for the commit watcher.
    pub(crate) async fn dedicated_connection(&self) -> Result<sqlx::SqliteConnection, StoreError> {
        use sqlx::ConnectOptions;
        Ok(connect_options(&self.path, self.busy_timeout)
            .connect()
            .await?)
    }

    /// Whether the database answers a trivial query (health checks).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Switches the file to WAL once, on a connection of its own, before any pool connection
/// opens. WAL is a property of the file, so the pool's connections need not ask for it;
/// when several connections ask at once on a new file, SQLite answers "database is locked"
/// to all but one without calling the busy handler. Another process doing the same at the
/// same moment is waited for, up to the busy timeout.
async fn ensure_wal(path: &Path, busy_timeout: Duration) -> Result<(), StoreError> {
    use sqlx::{ConnectOptions, Connection};
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let attempt = async {
            let mut conn = connect_options(path, busy_timeout).connect().await?;
            let result = sqlx::query_as::<_, (String,)>("PRAGMA journal_mode = WAL")
                .fetch_one(&mut conn)
                .await;
            conn.close().await?;
            result
        };
        match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) if is_busy(&e) && started.elapsed() < busy_timeout => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// True when a migration failed because another connection applied it meanwhile: a
/// duplicate row in `_sqlx_migrations`, a table that now exists, a column already added
/// (`ALTER TABLE … ADD COLUMN` has no `IF NOT EXISTS`), or a busy database.
fn lost_a_migration_race(error: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    let sqlx::Error::Database(db) = (match error {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => e,
        _ => return false,
    }) else {
        return false;
    };
    db.is_unique_violation()
        || db.message().contains("already exists")
        || db.message().contains("duplicate column name")
        || is_busy_code(&**db)
}

/// True for SQLITE_BUSY and its extended codes.
fn is_busy(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if is_busy_code(&**db))
}

/// SQLITE_BUSY (5) in the primary byte of an extended result code.
fn is_busy_code(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.code()
        .and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| c & 0xff == 5)
}

fn connect_options(path: &Path, busy_timeout: Duration) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        // NORMAL in WAL mode: a commit survives a process crash (kill -9); only a power
        // loss can lose the last transactions, which then are simply retried.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(busy_timeout)
        .foreign_keys(true)
        .pragma("temp_store", "memory")
        // The default 2 MB page cache is smaller than the indexes of a queue with 100k rows;
        // pages are only allocated when used, so an idle daemon stays small.
        .pragma("cache_size", "-16384")
        // No checkpoint inside a writer's commit: that would stall every writer behind it.
        // The daemon checkpoints from a task of its own (`checkpoint_if_grown`), and SQLite
        // checkpoints when the last connection closes.
        .pragma("wal_autocheckpoint", "0")
        .statement_cache_capacity(256)
}

/// Who may read and write the database files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMode {
    /// 0600: the daemon's user only; writers run as that user.
    Private,
    /// 0660: the daemon's group too, for writers that join it.
    GroupWritable,
}

impl FileMode {
    /// The mode `[database] group_writable` asks for.
    pub fn of(group_writable: bool) -> FileMode {
        if group_writable {
            FileMode::GroupWritable
        } else {
            FileMode::Private
        }
    }

    /// The permission bits.
    pub fn bits(self) -> u32 {
        match self {
            FileMode::Private => 0o600,
            FileMode::GroupWritable => 0o660,
        }
    }
}

/// Gives the database file and its `-wal`/`-shm` files (where present) `mode`, whatever
/// the umask made of them or an earlier configuration left. SQLite creates the `-wal` and
/// `-shm` files later with the database file's mode. A file this user does not own but
/// whose mode is already right is left alone (a writer in the group running the CLI).
fn set_file_modes(path: &Path, mode: FileMode) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut other = path.as_os_str().to_owned();
        other.push(suffix);
        files.push(PathBuf::from(other));
    }
    for file in files {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        if meta.permissions().mode() & 0o777 == mode.bits() {
            continue;
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode.bits())).map_err(
            |source| StoreError::Mode {
                path: file.clone(),
                mode: mode.bits(),
                source,
            },
        )?;
    }
    Ok(())
}

/// Creates the database file with `mode` (0600 by default) so SQLite (and its -wal/-shm
/// files, which take the database file's mode) never make it readable by others.
fn create_file(path: &Path, mode: FileMode) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::Create {
            path: path.to_path_buf(),
            source,
        })?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.bits())
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Unit tests of the queue machinery on both backends: for each `scenario(Database)` a
/// test on a fresh SQLite file and one on a fresh database of the throwaway PostgreSQL server
/// (skipped loudly without one, a failure under `CI=true`).
#[cfg(test)]
macro_rules! on_both_databases {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn sqlite() {
                let (_db, store) = crate::store::test_support::temp_store().await;
                super::$scenario(store.into()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(cluster) = crate::store::postgres::cluster::shared() else {
                    return;
                };
                let store = cluster.scratch_store().await.expect("scratch database");
                super::$scenario(store.clone().into()).await;
                store.close().await;
            }
        }
    )*};
}
#[cfg(test)]
pub(crate) use on_both_databases;

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A migrated store on a fresh file in a temporary directory; the guard closes the store
    /// before the directory goes.
    pub async fn temp_store() -> (super::scratch::ScratchDatabase, Store) {
        let db = super::scratch::ScratchDatabase::new(Duration::from_secs(5))
            .await
            .expect("open store");
        let store = db.store().clone();
        (db, store)
    }

    /// Inserts pending rebill rows of seller `T`, due since the epoch (so that any clock
    /// finds them due); their ids.
    pub async fn insert_due(store: &Store, ordernos: &[&str]) -> Vec<i64> {
        let mut ids = Vec::new();
        for orderno in ordernos {
            let done = sqlx::query(
                "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) VALUES (?1, 'T', 0)",
            )
            .bind(orderno)
            .execute(store.pool())
            .await
            .expect("insert");
            ids.push(done.last_insert_rowid());
        }
        ids
    }

    /// Claims up to `limit` due rebill rows at `now` under `token`, as on a queue without
    /// pauses.
    pub async fn claim_rebill(
        store: &Store,
        now: i64,
        limit: u32,
        lease: Duration,
        token: &str,
    ) -> super::claim::ClaimBatch<super::rows::RebillRow> {
        let params = super::claim::ClaimParams {
            now,
            limit,
            lease,
            claim_token: token,
            claimed_by: "test",
        };
        store
            .claim(&params, |_| super::pauses::ClaimPlan::unpaused())
            .await
            .expect("claim")
    }

    /// A result that marks row `id` (claimed under `token`) `done/accepted` at `now`.
    pub fn accepted(id: i64, token: &str, now: i64) -> super::complete::Completion {
        super::complete::Completion {
            id,
            claim_token: token.to_string(),
            status: super::complete::FinalStatus::Done,
            outcome: Some("accepted"),
            next_attempt_at: now,
            refund_attempt: false,
            last_code: Some("0".into()),
            last_message: Some("ok".into()),
            invoice_no: None,
            invoice_down_url: None,
            recent_attempts: None,
            pause: super::pauses::PauseChange::Nothing,
            confirm_since: None,
            attempt: None,
            now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::temp_store;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn file_is_private_and_in_wal_mode() {
        let (_dir, store) = temp_store().await;
        let mode = std::fs::metadata(store.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (journal,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(store.pool())
            .await
            .expect("pragma");
        assert_eq!(journal, "wal");
        store.migrate().await.expect("migrations are idempotent");
    }

    /// `group_writable` makes the database and the files SQLite adds beside it 0660, for
    /// writers in the daemon's group; turning it off again makes them 0600.
    #[tokio::test]
    async fn group_writable_files_are_0660_and_back() {
        use super::{FileMode, Store};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.db");
        let modes = || {
            ["", "-wal", "-shm"].map(|suffix| {
                let file = dir.path().join(format!("q.db{suffix}"));
                std::fs::metadata(&file)
                    .map(|m| m.permissions().mode() & 0o777)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            })
        };
        let busy = std::time::Duration::from_secs(5);
        let store = Store::open_with_mode(
            &path,
            busy,
            super::DEFAULT_WAL_LIMIT,
            FileMode::GroupWritable,
        )
        .await
        .expect("open");
        store.migrate().await.expect("migrate");
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES ('M', 'T')")
            .execute(store.pool())
            .await
            .expect("insert");
        assert_eq!(modes(), [0o660; 3]);
        let private =
            Store::open_with_mode(&path, busy, super::DEFAULT_WAL_LIMIT, FileMode::Private)
                .await
                .expect("reopen");
        assert_eq!(modes(), [0o600; 3]);
        private.close().await;
        store.close().await;
    }

    /// Several connections asking for WAL at once on a new file used to make all but one
    /// fail with "database is locked" (the busy handler is not called for that lock).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_opened_at_once_on_a_new_file_all_open() {
        for round in 0..100 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("q.db");
            let open = || super::Store::open(&path, std::time::Duration::from_secs(5));
            let (a, b, c) = tokio::join!(open(), open(), open());
            for store in [a, b, c] {
                let store = store.unwrap_or_else(|e| panic!("round {round}: {e}"));
                store.close().await;
            }
        }
    }
}
