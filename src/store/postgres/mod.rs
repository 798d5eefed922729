//! The PostgreSQL store: several daemons on several hosts drain one database. Same tables,
//! column names and meanings as the SQLite store (`migrations/postgres/`); its own SQL
//! (`sql`), written for row locks instead of one writer at a time: claims take rows with
//! `FOR UPDATE SKIP LOCKED`, completions are one `unnest` statement per batch, a probe is
//! claimed under its pause row's lock.
//!
//! Time: every due time, lease and pause is judged by the database's clock
//! (`invoice_worker_now_ms()`), not the host's, because hosts disagree. Callers keep
//! working in their own clock; each transaction reads the database's once and moves the
//! times that cross the boundary by the difference (see [`ClockBoundary`]).

mod admin;
pub mod cluster;
#[cfg(test)]
mod faults;
mod history;
pub mod housekeeping;
pub mod listen;
mod outbox;
mod page;
mod queue;
mod sql;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use housekeeping::HousekeepingTurn;

use super::StoreError;
use crate::secret::Secret;

/// The embedded PostgreSQL migrations (`migrations/postgres/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How to reach the server: `[database] url` and the settings around it.
#[derive(Clone)]
pub struct PgConnect {
    /// `postgres://user[:password]@host:port/db[?sslmode=…]`.
    pub url: String,
    /// The password from `password_file` or `INVOICE_WORKER_DATABASE_PASSWORD`, which wins
    /// over one in the URL.
    pub password: Option<Secret>,
    /// Most connections this daemon holds.
    pub pool_size: u32,
    /// How long connecting (and waiting for a pooled connection) may take.
    pub connect_timeout: Duration,
    /// The server cancels any statement running longer (0 = no limit).
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnect")
            .field("url", &scrub_url(&self.url))
            .field("password", &self.password)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

impl PgConnect {
    /// The defaults around `url`: 10 connections, 10 s to connect, 30 s per statement.
    pub fn new(url: impl Into<String>) -> PgConnect {
        PgConnect {
            url: url.into(),
            password: None,
            pool_size: 10,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
        }
    }

    fn options(&self) -> Result<PgConnectOptions, StoreError> {
        let mut options: PgConnectOptions =
            self.url
                .parse()
                .map_err(|e: sqlx::Error| StoreError::Connect {
                    url: scrub_url(&self.url),
                    reason: self.scrub(&e.to_string()),
                    auth: false,
                })?;
        if let Some(password) = &self.password {
            options = options.password(password.expose());
        }
        let timeout = self.statement_timeout.as_millis().to_string();
        Ok(options
            .application_name("invoice-worker")
            .options([("statement_timeout", timeout.as_str())]))
    }

    /// `text` without the password (from the URL or given apart), for error messages.
    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        let url_password = url::Url::parse(&self.url)
            .ok()
            .and_then(|u| u.password().map(str::to_string));
        for secret in url_password
            .iter()
            .map(String::as_str)
            .chain(self.password.as_ref().map(Secret::expose))
            .filter(|s| !s.is_empty())
        {
            out = out.replace(secret, "***");
        }
        out
    }

    fn connect_error(&self, e: sqlx::Error) -> StoreError {
        let auth = matches!(&e, sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("28P01" | "28000")));
        StoreError::Connect {
            url: scrub_url(&self.url),
            reason: self.scrub(&e.to_string()),
            auth,
        }
    }
}

/// `url` with any password replaced by `***` (userinfo and a `password=` query parameter),
/// for logs, errors and `check-config`. A URL that does not parse is shown only up to
/// its scheme.
pub fn scrub_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        return format!("{scheme}://(unparsable URL, not shown)");
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    let hidden: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| {
            let v = if k.eq_ignore_ascii_case("password") {
                "***".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    if !hidden.is_empty() {
        parsed.query_pairs_mut().clear().extend_pairs(hidden);
    }
    parsed.to_string()
}

/// A handle on the PostgreSQL queue database, cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    statements: std::sync::Arc<super::PerQueue<sql::QueueSql>>,
    url: String,
    history: bool,
    alerts: bool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// A pooled connection idle at least this long is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_millis(100);

impl PgStore {
    /// Connects (one connection is opened at once, so that a wrong password or an
    /// unreachable server is an error here, not at the first claim). Does not migrate.
    pub async fn connect(connect: &PgConnect) -> Result<PgStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(connect.pool_size.max(1))
            .min_connections(1)
            .acquire_timeout(connect.connect_timeout)
            // A connection the server dropped while it sat idle (a restart, a reset, a
            // middlebox's idle timeout) is found out before use and replaced, instead of
            // failing the statement given to it. Only one idle for a while is pinged: sqlx
            // already pings every connection as it is returned, and a ping per acquire
            // under load costs a fifth of the end-to-end rate.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect.options()?)
            .await
            .map_err(|e| connect.connect_error(e))?;
        Ok(PgStore {
            pool,
            statements: std::sync::Arc::new(super::PerQueue::new(sql::QueueSql::new)),
            url: scrub_url(&connect.url),
            history: true,
            alerts: false,
        })
    }

    /// Connects and applies the embedded migrations.
    pub async fn connect_and_migrate(connect: &PgConnect) -> Result<PgStore, StoreError> {
        let store = PgStore::connect(connect).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the embedded migrations (idempotent; sqlx serialises concurrent runs of
    /// several daemons with an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        Ok(MIGRATOR.run(&self.pool).await?)
    }

    /// Whether attempts are recorded in the history (on by default).
    pub fn with_history(mut self, on: bool) -> PgStore {
        self.history = on;
        self
    }

    /// Whether pauses started and lifted raise alerts (off by default).
    pub fn with_alerts(mut self, on: bool) -> PgStore {
        self.alerts = on;
        self
    }

    /// `[database] url` without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's clock, epoch ms: the one every host's daemon goes by.
    pub async fn database_now(&self) -> Result<i64, StoreError> {
        let (now,): (i64,) = sqlx::query_as("SELECT invoice_worker_now_ms()")
            .fetch_one(&self.pool)
            .await?;
        Ok(now)
    }

    /// Whether the database answers a trivial query (health checks).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The underlying pool, for the crate's tests.
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn sql(&self, queue: super::QueueName) -> &sql::QueueSql {
        self.statements.of(queue)
    }
}

/// The difference between a caller's clock and the database's, read once per transaction:
/// times the caller computed (`now + backoff`) go in as the same distance from the
/// database's now, and times read back come out in the caller's clock. A host whose clock
/// is off by an hour thus leases, schedules and pauses exactly as one whose clock is right.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClockBoundary {
    /// The database's now, ms.
    pub database_now: i64,
    /// The caller's now, ms.
    pub caller_now: i64,
}

impl ClockBoundary {
    /// Reads the database's clock on `conn` for a caller whose clock says `caller_now`.
    pub async fn read(
        conn: &mut sqlx::PgConnection,
        caller_now: i64,
    ) -> Result<ClockBoundary, StoreError> {
        let (database_now,): (i64,) = sqlx::query_as("SELECT invoice_worker_now_ms()")
            .fetch_one(&mut *conn)
            .await?;
        Ok(ClockBoundary {
            database_now,
            caller_now,
        })
    }

    /// The same database reading for a caller whose clock said `caller_now` (the items
    /// of one batch each carry their own now).
    pub fn for_caller(self, caller_now: i64) -> ClockBoundary {
        ClockBoundary {
            database_now: self.database_now,
            caller_now,
        }
    }

    /// A time in the caller's clock, in the database's.
    pub fn inbound(self, caller_time: i64) -> i64 {
        caller_time
            .saturating_sub(self.caller_now)
            .saturating_add(self.database_now)
    }

    /// A time in the database's clock, in the caller's.
    pub fn outbound(self, database_time: i64) -> i64 {
        database_time
            .saturating_sub(self.database_now)
            .saturating_add(self.caller_now)
    }

    /// A JSON array of times (`recent_attempts`) moved with `shift`; a value that is not
    /// such an array is left as it is (the claim path treats it as empty).
    pub fn shift_times(text: &str, shift: impl Fn(i64) -> i64) -> String {
        match serde_json::from_str::<Vec<i64>>(text) {
            Ok(times) => serde_json::to_string(&times.into_iter().map(shift).collect::<Vec<_>>())
                .unwrap_or_else(|_| text.to_string()),
            Err(_) => text.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbed_urls_keep_everything_but_the_password() {
        assert_eq!(
            scrub_url("postgres://worker:s3cr%3At@db.example:5432/invoices?sslmode=require"),
            "postgres://worker:***@db.example:5432/invoices?sslmode=require"
        );
        assert_eq!(
            scrub_url("postgres://worker@db/invoices?password=hunter2&sslmode=verify-full"),
            "postgres://worker@db/invoices?password=***&sslmode=verify-full"
        );
        assert_eq!(
            scrub_url("postgres://db/invoices"),
            "postgres://db/invoices"
        );
        let broken = scrub_url("postgres://user:pass@[::1");
        assert!(!broken.contains("pass"), "{broken}");
    }

    #[test]
    fn the_debug_form_of_the_settings_shows_no_password() {
        let mut c = PgConnect::new("postgres://u:hunter2@h/db");
        c.password = Some(Secret::new("other-secret"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("other-secret"),
            "{shown}"
        );
        assert_eq!(c.scrub("x hunter2 y other-secret"), "x *** y ***");
    }

    #[test]
    fn times_cross_the_clock_boundary_both_ways() {
        // The caller's clock is an hour behind the database's.
        let b = ClockBoundary {
            database_now: 10_000_000,
            caller_now: 10_000_000 - 3_600_000,
        };
        assert_eq!(b.inbound(b.caller_now + 5_000), b.database_now + 5_000);
        assert_eq!(b.outbound(b.database_now - 7), b.caller_now - 7);
        assert_eq!(b.inbound(i64::MAX), i64::MAX, "saturates, never overflows");
        assert_eq!(
            ClockBoundary::shift_times("[1,2]", |t| b.outbound(t)),
            format!("[{},{}]", b.outbound(1), b.outbound(2))
        );
        assert_eq!(ClockBoundary::shift_times("junk", |t| t + 1), "junk");
    }
}
