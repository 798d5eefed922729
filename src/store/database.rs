//! The store the daemon, the CLI, the console and the sandbox run on: SQLite or
//! PostgreSQL, chosen by `[database]`. The queue machinery holds a [`Database`] and calls
//! the operations of [`QueueStore`], [`AlertStore`] and [`InspectStore`] on it; which
//! backend answers is decided here, once per call, and nowhere else.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::admin::{Enqueued, NewRebill, NewTitle, PauseInfo, QueueCounts, RowSummary};
use super::claim::{ClaimBatch, ClaimParams};
use super::complete::Completion;
use super::driver::{
    AlertStore, HeldParams, InspectStore, PauseParams, PruneParams, QueueStore, RenewParams,
    RescueParams,
};
use super::history::{HistoryEntry, MinuteCount};
use super::outbox::{AlertDelivery, AlertReport, ClaimedAlert};
use super::page::{PageCursor, RowFilter, RowPage};
use super::pauses::{ClaimPlan, PauseView};
use super::postgres::{HousekeepingTurn, PgConnect, PgStore};
use super::rows::QueueRow;
use super::services::StoreServices;
use super::show::RowDetail;
use super::{FileMode, QueueName, Store, StoreError};
use crate::alerts::Event;

/// Where `[database]` says the queue lives, resolved from the config (the password read).
#[derive(Debug, Clone)]
pub enum Location {
    /// A SQLite file on this host.
    Sqlite {
        /// The file.
        path: PathBuf,
        /// How long a statement waits for another connection's write lock.
        busy_timeout: Duration,
        /// The size the `-wal` file is kept under, bytes.
        wal_limit: u64,
        /// Its files' mode.
        mode: FileMode,
    },
    /// A PostgreSQL database several daemons may share.
    Postgres(PgConnect),
}

impl Location {
    /// Where it is, for logs and messages: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite { path, .. } => path.display().to_string(),
            Location::Postgres(connect) => super::postgres::scrub_url(&connect.url),
        }
    }
}

/// A handle on the queue database, whichever backend holds it; cheap to clone.
#[derive(Debug, Clone)]
pub enum Database {
    /// The embedded SQLite file.
    Sqlite(Store),
    /// A PostgreSQL server.
    Postgres(PgStore),
}

impl From<Store> for Database {
    fn from(store: Store) -> Database {
        Database::Sqlite(store)
    }
}

impl From<PgStore> for Database {
    fn from(store: PgStore) -> Database {
        Database::Postgres(store)
    }
}

/// Runs `$body` with `$s` bound to whichever store `$db` holds.
macro_rules! on_backend {
    ($db:expr, $s:ident => $body:expr) => {
        match $db {
            Database::Sqlite($s) => $body,
            Database::Postgres($s) => $body,
        }
    };
}

impl Database {
    /// Opens (creating a SQLite file if missing) and migrates the database at `location`.
    pub async fn open(location: &Location) -> Result<Database, StoreError> {
        Ok(match location {
            Location::Sqlite {
                path,
                busy_timeout,
                wal_limit,
                mode,
            } => {
                let store = Store::open_with_mode(path, *busy_timeout, *wal_limit, *mode).await?;
                store.migrate().await?;
                Database::Sqlite(store)
            }
            Location::Postgres(connect) => {
                Database::Postgres(PgStore::connect_and_migrate(connect).await?)
            }
        })
    }

    /// How long a small batch of results may wait for more before it is written. Every
    /// write to PostgreSQL is a round trip to a server that other daemons share, so a busy
    /// queue's writes are worth gathering (two daemons went from 0.94× to 1.13× one in the
    /// bench); a SQLite write is local and is not held back.
    pub fn completion_linger(&self) -> Duration {
        match self {
            Database::Sqlite(_) => Duration::ZERO,
            Database::Postgres(_) => Duration::from_millis(2),
        }
    }

    /// Which backend this is (`sqlite`, `postgres`), for logs and metrics.
    pub fn backend(&self) -> &'static str {
        match self {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }

    /// Where it is: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(s) => s.path().display().to_string(),
            Database::Postgres(p) => p.url().to_string(),
        }
    }

    /// The SQLite store, when this is one (its file, WAL and query plans have no
    /// PostgreSQL counterpart).
    pub fn as_sqlite(&self) -> Option<&Store> {
        match self {
            Database::Sqlite(s) => Some(s),
            Database::Postgres(_) => None,
        }
    }

    /// The PostgreSQL store, when this is one.
    pub fn as_postgres(&self) -> Option<&PgStore> {
        match self {
            Database::Sqlite(_) => None,
            Database::Postgres(p) => Some(p),
        }
    }

    /// Applies the embedded migrations of its backend (idempotent).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        on_backend!(self, s => s.migrate().await)
    }

    /// Whether pauses started and lifted raise alerts.
    pub fn with_alerts(self, on: bool) -> Database {
        match self {
            Database::Sqlite(s) => Database::Sqlite(s.with_alerts(on)),
            Database::Postgres(p) => Database::Postgres(p.with_alerts(on)),
        }
    }

    /// Whether attempts are recorded in the history.
    pub fn with_history(self, on: bool) -> Database {
        match self {
            Database::Sqlite(s) => Database::Sqlite(s.with_history(on)),
            Database::Postgres(p) => Database::Postgres(p.with_history(on)),
        }
    }

    /// Whether the database answers a trivial query (`/healthz`).
    pub async fn ping(&self) -> bool {
        on_backend!(self, s => s.ping().await)
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        on_backend!(self, s => s.close().await)
    }

    /// Starts the backend's background services until `stop`: what wakes idle workers
    /// when rows arrive (file notifications or LISTEN/NOTIFY, with `fallback_poll`), and on
    /// SQLite the WAL keeper.
    pub async fn start_services(
        &self,
        fallback_poll: Duration,
        stop: CancellationToken,
    ) -> Result<StoreServices, StoreError> {
        match self {
            Database::Sqlite(s) => s.start_services(fallback_poll, stop).await,
            Database::Postgres(p) => {
                let watch = p.watch_commits(fallback_poll, stop).await?;
                Ok(StoreServices::of_watch(watch))
            }
        }
    }

    /// Rejects rows whose scheduling columns a writer filled with values of the wrong type
    /// (SQLite stores what it is given); how many. PostgreSQL's typed columns refuse such
    /// values at insert, so there it has nothing to do.
    pub async fn reject_unschedulable(
        &self,
        queue: QueueName,
        now: i64,
    ) -> Result<u64, StoreError> {
        match self {
            Database::Sqlite(s) => s.reject_unschedulable(queue, now).await,
            Database::Postgres(_) => Ok(0),
        }
    }

    /// Makes the WAL small again after housekeeping deleted rows (SQLite); PostgreSQL's
    /// autovacuum and checkpointer need no help.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        match self {
            Database::Sqlite(s) => s.checkpoint().await,
            Database::Postgres(_) => Ok(()),
        }
    }

    /// The right to make the housekeeping run scheduled at `slot` (epoch ms). On
    /// PostgreSQL one daemon of all that share the database gets it; `None` for the
    /// others. Every daemon on a SQLite file makes its own (they share one host, and
    /// pruning twice deletes nothing twice).
    pub async fn housekeeping_turn(
        &self,
        slot: i64,
        instance: &str,
    ) -> Result<Option<HousekeepingRun>, StoreError> {
        match self {
            Database::Sqlite(_) => Ok(Some(HousekeepingRun(None))),
            Database::Postgres(p) => Ok(p
                .housekeeping_turn(slot, instance)
                .await?
                .map(|turn| HousekeepingRun(Some(turn)))),
        }
    }

    /// Counts of the active statuses (pending, running), the oldest due row's age and rows
    /// awaiting confirmation: cheap, refreshed often.
    pub async fn active_counts(
        &self,
        queue: QueueName,
        now: i64,
    ) -> Result<QueueCounts, StoreError> {
        on_backend!(self, s => s.active_counts(queue, now).await)
    }

    /// Counts of the finished statuses: a scan of their index, refreshed rarely.
    pub async fn finished_counts(
        &self,
        queue: QueueName,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        on_backend!(self, s => s.finished_counts(queue).await)
    }

    /// A page of rows for the console (see [`super::page`]).
    pub async fn rows_page(
        &self,
        queue: QueueName,
        filter: &RowFilter,
        after: Option<PageCursor>,
        limit: u32,
    ) -> Result<RowPage, StoreError> {
        on_backend!(self, s => super::page::rows_page(s, queue, filter, after, limit).await)
    }

    /// The size of SQLite's `-wal` file and the limit it is kept under, bytes (none on
    /// PostgreSQL).
    pub fn wal(&self) -> Option<(u64, u64)> {
        self.as_sqlite().map(|s| (s.wal_size(), s.wal_limit()))
    }
}

/// One scheduled housekeeping run this daemon makes; [`HousekeepingRun::finish`] marks it
/// made across the cluster.
pub struct HousekeepingRun(Option<HousekeepingTurn>);

impl HousekeepingRun {
    /// Marks the run made (on PostgreSQL no other daemon makes the same slot's run).
    pub async fn finish(self) -> Result<(), StoreError> {
        match self.0 {
            Some(turn) => turn.finish().await,
            None => Ok(()),
        }
    }
}

impl QueueStore for Database {
    async fn enqueue_rebill(&self, job: &NewRebill, now: i64) -> Result<Enqueued, StoreError> {
        on_backend!(self, s => QueueStore::enqueue_rebill(s, job, now).await)
    }

    async fn enqueue_title(&self, job: &NewTitle) -> Result<i64, StoreError> {
        on_backend!(self, s => QueueStore::enqueue_title(s, job).await)
    }

    async fn set_title_serial(
        &self,
        id: i64,
        claim_token: &str,
        serial: &str,
    ) -> Result<bool, StoreError> {
        on_backend!(self, s => QueueStore::set_title_serial(s, id, claim_token, serial).await)
    }

    async fn claim<R: QueueRow>(
        &self,
        params: &ClaimParams<'_>,
        plan: impl FnOnce(&[PauseView]) -> ClaimPlan + Send,
    ) -> Result<ClaimBatch<R>, StoreError> {
        on_backend!(self, s => QueueStore::claim(s, params, plan).await)
    }

    async fn complete(
        &self,
        queue: QueueName,
        items: &[Completion],
    ) -> Result<Vec<bool>, StoreError> {
        on_backend!(self, s => QueueStore::complete(s, queue, items).await)
    }

    async fn renew_leases(&self, params: RenewParams<'_>) -> Result<Vec<bool>, StoreError> {
        on_backend!(self, s => QueueStore::renew_leases(s, params).await)
    }

    async fn rescue_expired(&self, params: RescueParams) -> Result<u64, StoreError> {
        on_backend!(self, s => QueueStore::rescue_expired(s, params).await)
    }

    async fn release(&self, params: HeldParams<'_>) -> Result<u64, StoreError> {
        on_backend!(self, s => QueueStore::release(s, params).await)
    }

    async fn next_due_after(&self, queue: QueueName, now: i64) -> Result<Option<i64>, StoreError> {
        on_backend!(self, s => QueueStore::next_due_after(s, queue, now).await)
    }

    async fn prune_batch(&self, params: PruneParams<'_>) -> Result<u64, StoreError> {
        on_backend!(self, s => QueueStore::prune_batch(s, params).await)
    }

    async fn counts(&self, queue: QueueName, now: i64) -> Result<QueueCounts, StoreError> {
        on_backend!(self, s => QueueStore::counts(s, queue, now).await)
    }

    async fn rescue_needed(&self, queue: QueueName, now: i64) -> Result<bool, StoreError> {
        on_backend!(self, s => QueueStore::rescue_needed(s, queue, now).await)
    }

    async fn retry(&self, queue: QueueName, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        on_backend!(self, s => QueueStore::retry(s, queue, ids).await)
    }

    async fn retry_failed(
        &self,
        queue: QueueName,
        seller: Option<&str>,
    ) -> Result<u64, StoreError> {
        on_backend!(self, s => QueueStore::retry_failed(s, queue, seller).await)
    }

    async fn list(
        &self,
        queue: QueueName,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RowSummary>, StoreError> {
        on_backend!(self, s => QueueStore::list(s, queue, status, limit).await)
    }

    async fn cancel(&self, queue: QueueName, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        on_backend!(self, s => QueueStore::cancel(s, queue, ids).await)
    }

    async fn pause(&self, params: PauseParams<'_>) -> Result<(), StoreError> {
        on_backend!(self, s => QueueStore::pause(s, params).await)
    }

    async fn resume(&self, queue: QueueName, scope: &str, now: i64) -> Result<bool, StoreError> {
        on_backend!(self, s => QueueStore::resume(s, queue, scope, now).await)
    }

    async fn pauses(&self, now: i64) -> Result<Vec<PauseInfo>, StoreError> {
        on_backend!(self, s => QueueStore::pauses(s, now).await)
    }
}

impl AlertStore for Database {
    async fn raise_alert(&self, event: &Event) -> Result<(), StoreError> {
        on_backend!(self, s => AlertStore::raise_alert(s, event).await)
    }

    async fn claim_alerts(
        &self,
        now: i64,
        lease: Duration,
        token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedAlert>, StoreError> {
        on_backend!(self, s => AlertStore::claim_alerts(s, now, lease, token, limit).await)
    }

    async fn finish_alert(
        &self,
        id: i64,
        token: &str,
        delivered_to: &[String],
        result: &AlertDelivery,
        now: i64,
    ) -> Result<bool, StoreError> {
        on_backend!(self, s => AlertStore::finish_alert(s, id, token, delivered_to, result, now).await)
    }

    async fn next_alert_due(&self, now: i64) -> Result<Option<i64>, StoreError> {
        on_backend!(self, s => AlertStore::next_alert_due(s, now).await)
    }

    async fn record_target(
        &self,
        name: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        on_backend!(self, s => AlertStore::record_target(s, name, error, now).await)
    }

    async fn alert_report(&self, now: i64) -> Result<AlertReport, StoreError> {
        on_backend!(self, s => AlertStore::alert_report(s, now).await)
    }

    async fn digest_failed(
        &self,
        queue: QueueName,
        now: i64,
        every: Duration,
    ) -> Result<Option<Event>, StoreError> {
        on_backend!(self, s => AlertStore::digest_failed(s, queue, now, every).await)
    }

    async fn watch_stuck(
        &self,
        queue: QueueName,
        now: i64,
        after: Duration,
    ) -> Result<Option<Event>, StoreError> {
        on_backend!(self, s => AlertStore::watch_stuck(s, queue, now, after).await)
    }

    async fn prune_alerts(&self, before: i64, batch: u32, now: i64) -> Result<u64, StoreError> {
        on_backend!(self, s => AlertStore::prune_alerts(s, before, batch, now).await)
    }
}

impl InspectStore for Database {
    async fn show(&self, queue: QueueName, id: i64) -> Result<Option<RowDetail>, StoreError> {
        on_backend!(self, s => InspectStore::show(s, queue, id).await)
    }

    async fn attempt_history(
        &self,
        queue: QueueName,
        id: i64,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        on_backend!(self, s => InspectStore::attempt_history(s, queue, id).await)
    }

    async fn attempts_per_minute(
        &self,
        queue: QueueName,
        since: i64,
    ) -> Result<Vec<MinuteCount>, StoreError> {
        on_backend!(self, s => InspectStore::attempts_per_minute(s, queue, since).await)
    }

    async fn prune_minutes(&self, before: i64) -> Result<u64, StoreError> {
        on_backend!(self, s => InspectStore::prune_minutes(s, before).await)
    }

    async fn prune_orphaned_history(&self) -> Result<u64, StoreError> {
        on_backend!(self, s => InspectStore::prune_orphaned_history(s).await)
    }

    async fn optimize(&self) -> Result<(), StoreError> {
        on_backend!(self, s => InspectStore::optimize(s).await)
    }
}
