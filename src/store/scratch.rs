//! A throwaway database in a temporary directory, for the sandbox, the tests and the
//! benchmark: the one place that makes sure a database is closed before its files go.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Store, StoreError};

/// How long dropping a scratch database waits for its connections to be returned.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// The same from a current-thread runtime, where a connection still on its way back cannot
/// arrive while the drop waits (see `Drop`): long enough to close the idle ones.
const CURRENT_THREAD_CLOSE_LIMIT: Duration = Duration::from_millis(300);

/// A migrated store on a fresh file in a temporary directory. The directory is removed
/// only after the store is closed: [`ScratchDatabase::close`] does both in order, and
/// dropping it without `close` closes the pool first from a helper thread.
pub struct ScratchDatabase {
    store: Store,
    dir: Option<tempfile::TempDir>,
}

impl ScratchDatabase {
    /// Makes the directory and a migrated database `queue.db` in it.
    pub async fn new(busy_timeout: Duration) -> Result<ScratchDatabase, StoreError> {
        let dir = tempfile::Builder::new()
            .prefix("invoice-worker-")
            .tempdir()
            .map_err(|source| StoreError::Create {
                path: std::env::temp_dir(),
                source,
            })?;
        let store = Store::open_and_migrate(&dir.path().join("queue.db"), busy_timeout).await?;
        Ok(ScratchDatabase {
            store,
            dir: Some(dir),
        })
    }

    /// The store (clones share one pool).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The temporary directory, for files that belong with the database (configs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("."), |d| d.path())
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        self.store.path().to_path_buf()
    }

    /// Closes the store, then removes the directory.
    pub async fn close(mut self) {
        self.store.close().await;
        drop(self.dir.take());
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        // Drop cannot await, and the caller's runtime may be the one dropping us: close the
        // pool on a thread with a runtime of its own (closing needs no other task).
        // On a current-thread runtime (a `#[tokio::test]`) a connection dropped a moment ago
        // goes back to the pool through a task on this very thread, which cannot run while
        // this waits: closing the idle connections is all that can happen, so the wait is
        // short there. The late one is closed when it comes back to the closed pool; its
        // files are already unlinked, which an open SQLite connection on Linux outlives.
        let limit = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => CURRENT_THREAD_CLOSE_LIMIT,
            _ => CLOSE_LIMIT,
        };
        let store = self.store.clone();
        let closed = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    let _ = tokio::time::timeout(limit, store.close()).await;
                });
            }
        })
        .join();
        if closed.is_err() {
            tracing::warn!(dir = %dir.path().display(), "closing a scratch database panicked");
        }
        drop(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::admin::{Enqueued, NewRebill};
    use crate::store::claim::ClaimParams;
    use crate::store::now_ms;
    use crate::store::pauses::ClaimPlan;
    use crate::store::rows::RebillRow;

    /// Opens (three stores at once on the new file, as a daemon, a second daemon and the
    /// CLI starting together would), migrates, uses and drops one database; the error text
    /// if anything failed.
    async fn use_one(task: usize, round: usize) -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let path = dir.path().join("queue.db");
        let open = || Store::open_and_migrate(&path, Duration::from_secs(5));
        let (a, b, c) = tokio::join!(open(), open(), open());
        let mut stores = Vec::new();
        let mut errors = Vec::new();
        for store in [a, b, c] {
            match store {
                Ok(store) => stores.push(store),
                Err(e) => errors.push(format!("open: {e}")),
            }
        }
        let result = match (errors.is_empty(), stores.first()) {
            (true, Some(store)) => exercise(store, task, round).await,
            _ => Err(errors.join("; ")),
        };
        for store in stores {
            store.close().await;
        }
        drop(dir);
        result?;
        // And once through the scratch database itself, closed or only dropped.
        let db = ScratchDatabase::new(Duration::from_secs(5))
            .await
            .map_err(|e| format!("scratch open: {e}"))?;
        exercise(db.store(), task, round).await?;
        if round.is_multiple_of(2) {
            db.close().await;
        } else {
            drop(db);
        }
        Ok(())
    }

    /// An insert, a claim of it: the store works.
    async fn exercise(store: &Store, task: usize, round: usize) -> Result<(), String> {
        let job = NewRebill {
            orderno: format!("S-{task}-{round}"),
            tax_num: "91310117568051222X".into(),
            max_attempts: None,
            not_before: None,
        };
        match store.enqueue_rebill(&job).await {
            Ok(Enqueued::Inserted(_)) => {}
            other => return Err(format!("enqueue: {other:?}")),
        }
        let claimed = store
            .claim::<RebillRow>(
                &ClaimParams {
                    now: now_ms() + 1,
                    limit: 4,
                    lease: Duration::from_secs(30),
                    claim_token: "tok",
                    claimed_by: "stress",
                },
                |_| ClaimPlan::unpaused(),
            )
            .await
            .map_err(|e| format!("claim: {e}"))?;
        if claimed.rows.len() != 1 {
            return Err(format!("claimed {} rows, expected 1", claimed.rows.len()));
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn five_hundred_fresh_databases_from_many_tasks_open_without_a_lock_error() {
        const TASKS: usize = 25;
        const ROUNDS: usize = 20;
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            tasks.spawn(async move {
                let mut errors = Vec::new();
                for round in 0..ROUNDS {
                    if let Err(e) = use_one(task, round).await {
                        errors.push(format!("task {task} round {round}: {e}"));
                    }
                }
                errors
            });
        }
        let mut errors = Vec::new();
        while let Some(result) = tasks.join_next().await {
            errors.extend(result.expect("task"));
        }
        assert!(
            errors.is_empty(),
            "{} of {} failed: {errors:#?}",
            errors.len(),
            TASKS * ROUNDS
        );
    }

    #[tokio::test]
    async fn the_directory_goes_only_after_the_store_is_closed() {
        let db = ScratchDatabase::new(Duration::from_secs(5))
            .await
            .expect("open");
        let dir = db.dir().to_path_buf();
        let store = db.store().clone();
        assert!(store.ping().await);
        drop(db);
        assert!(!dir.exists(), "directory removed");
        assert!(
            !store.ping().await,
            "the pool was closed before the files went"
        );
    }
}
