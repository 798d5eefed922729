//! The SQLite store's own background services, started once per process: the commit
//! watcher (which wakes idle workers when another connection commits) and the WAL keeper
//! (which checkpoints beside the writers). Another backend brings its own.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::watch::WatchMode;
use super::{Store, StoreError};

/// The running services; they end when the `stop` they were started with is cancelled.
pub struct StoreServices {
    /// Ticks (its value changes) when another connection committed.
    pub wake: watch::Receiver<u64>,
    /// How commits are noticed.
    pub mode: WatchMode,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl StoreServices {
    /// The services of a backend whose only one is its commit watcher.
    pub(crate) fn of_watch(watch: super::watch::CommitWatch) -> StoreServices {
        StoreServices {
            wake: watch.wake,
            mode: watch.mode,
            tasks: vec![watch.task],
        }
    }

    /// Waits for every service to end (after `stop`).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

impl Store {
    /// Starts the commit watcher (polling every `fallback_poll` where file notifications
    /// cannot be trusted) and the WAL keeper, until `stop`.
    pub async fn start_services(
        &self,
        fallback_poll: Duration,
        stop: CancellationToken,
    ) -> Result<StoreServices, StoreError> {
        let commits = self.watch_commits(fallback_poll, stop.clone()).await?;
        let wal = tokio::spawn(super::wal::keep_small(
            self.clone(),
            commits.wake.clone(),
            stop,
        ));
        Ok(StoreServices {
            wake: commits.wake,
            mode: commits.mode,
            tasks: vec![commits.task, wal],
        })
    }
}
