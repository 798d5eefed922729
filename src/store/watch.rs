//! Noticing commits made by other connections (other processes' inserts) cheaply.

use std::path::PathBuf;
use std::time::SystemTime;

use sqlx::SqliteConnection;

use super::{Store, StoreError};

/// How many cheap file checks pass between two `PRAGMA data_version` queries.
const PRAGMA_EVERY: u32 = 40;

/// Notices commits by other connections. Every commit in WAL mode writes the `-wal` file,
/// so comparing its size and modification time (one `stat`, no trip to SQLite's thread)
/// catches them; `PRAGMA data_version`, which changes whenever another connection commits,
/// is asked now and then as well, in case a file system's timestamps are too coarse.
pub struct CommitWatcher {
    conn: SqliteConnection,
    files: [PathBuf; 2],
    last_files: [Option<(u64, SystemTime)>; 2],
    last_version: Option<i64>,
    calls: u32,
}

impl CommitWatcher {
    /// Opens the dedicated connection used for `data_version`.
    pub async fn new(store: &Store) -> Result<CommitWatcher, StoreError> {
        let db = store.path().to_path_buf();
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        Ok(CommitWatcher {
            conn: store.dedicated_connection().await?,
            files: [PathBuf::from(wal), db],
            last_files: [None, None],
            last_version: None,
            calls: 0,
        })
    }

    /// True when some other connection committed since the previous call (and on the
    /// first call).
    pub async fn changed(&mut self) -> Result<bool, StoreError> {
        let mut changed = false;
        for (file, last) in self.files.iter().zip(self.last_files.iter_mut()) {
            // A blocking stat is a few microseconds: cheaper than handing it to a thread.
            let now = std::fs::metadata(file)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)));
            if now != *last {
                *last = now;
                changed = true;
            }
        }
        self.calls = self.calls.wrapping_add(1);
        if changed || self.calls.is_multiple_of(PRAGMA_EVERY) || self.last_version.is_none() {
            let (version,): (i64,) = sqlx::query_as("PRAGMA data_version")
                .fetch_one(&mut self.conn)
                .await?;
            changed |= self.last_version != Some(version);
            self.last_version = Some(version);
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    #[tokio::test]
    async fn sees_commits_of_other_connections() {
        let (_dir, store) = temp_store().await;
        let mut watcher = CommitWatcher::new(&store).await.expect("watcher");
        assert!(
            watcher.changed().await.expect("check"),
            "first call reports a change"
        );
        assert!(!watcher.changed().await.expect("check"));
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES ('w1', 'T')")
            .execute(store.pool())
            .await
            .expect("insert");
        assert!(watcher.changed().await.expect("check"));
        assert!(!watcher.changed().await.expect("check"));
    }
}
