//! The write-ahead log: checkpoints, and the task that keeps the `-wal` file small.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

impl Store {
    /// Checkpoints the WAL into the database file (PASSIVE: never waits for readers).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Checkpoints the WAL in this process's turn to write, so that none of this process's
    /// commits lands between the checkpoint and the next write (which may then restart the
    /// WAL from its beginning instead of appending). `truncate` also cuts the file to zero
    /// bytes; it waits for other processes' writers and readers on an older snapshot, but
    /// at most 100 ms (this process's writers wait meanwhile): a busy database is simply
    /// checkpointed at the next chance.
    pub async fn checkpoint_between_writes(&self, truncate: bool) -> Result<(), StoreError> {
        let sql = if truncate {
            "PRAGMA wal_checkpoint(TRUNCATE)"
        } else {
            "PRAGMA wal_checkpoint(PASSIVE)"
        };
        self.in_turn_briefly(sql, std::time::Duration::from_millis(100))
            .await
    }
}

/// A checkpoint that met other processes' writers is simply tried at the next chance; only
/// other failures are worth a warning.
fn report_checkpoint_failure(error: &StoreError, wal_bytes: u64) {
    if error.is_busy() {
        tracing::debug!(%error, wal_bytes, "WAL checkpoint postponed: the database is busy");
    } else {
        tracing::warn!(%error, wal_bytes, "WAL checkpoint failed");
    }
}

/// Keeps the `-wal` file small from a task of its own (connections run with
/// `wal_autocheckpoint = 0`, so no writer's commit pays for a checkpoint). Woken by the
/// commit watcher:
/// - half a second after commits it checkpoints PASSIVE, beside the writers: a checkpoint
///   syncs the database file, which must neither hold writers up nor coincide with the
///   claim and the send the commit itself started;
/// - once the `-wal` file reached a quarter of the limit it checkpoints TRUNCATE in this
///   process's turn to write: under steady load one of the daemon's own commits always lands
///   during a PASSIVE checkpoint, so the WAL would never restart from its beginning;
/// - after a quiet second it truncates what is left.
///
/// An idle daemon never wakes for it.
pub(super) async fn keep_small(
    store: Store,
    mut commits: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
) {
    const AFTER: Duration = Duration::from_millis(500);
    const QUIET: Duration = Duration::from_secs(1);
    let limit = store.wal_limit();
    // Whether the WAL may hold frames since it was last truncated.
    let mut dirty = true;
    loop {
        let committed = tokio::select! {
            changed = commits.changed() => if changed.is_err() { return } else { true },
            _ = tokio::time::sleep(QUIET), if dirty => false,
            _ = stop.cancelled() => return,
        };
        if committed {
            dirty = true;
            // Wait AFTER, but cut the wait short when the file reaches a quarter of the
            // limit meanwhile (a busy daemon writes tens of megabytes a second).
            let until = tokio::time::Instant::now() + AFTER;
            while store.wal_size() < limit / 4 {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    changed = commits.changed() => if changed.is_err() { return },
                    _ = stop.cancelled() => return,
                }
            }
        }
        let size = store.wal_size();
        let result = if !committed || size >= limit / 4 {
            if size == 0 {
                dirty = false;
                continue;
            }
            store.checkpoint_between_writes(true).await
        } else {
            store.checkpoint().await
        };
        match result {
            Ok(()) => dirty = committed,
            Err(e) => report_checkpoint_failure(&e, size),
        }
    }
}
