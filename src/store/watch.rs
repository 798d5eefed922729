//! Noticing commits made by other connections (other processes' inserts) cheaply.

use sqlx::SqliteConnection;

use super::{Store, StoreError};

/// Watches `PRAGMA data_version` on one dedicated connection: the value changes whenever
/// another connection commits, which costs a few microseconds to check.
pub struct CommitWatcher {
    conn: SqliteConnection,
    last: Option<i64>,
}

impl CommitWatcher {
    /// Opens the dedicated connection.
    pub async fn new(store: &Store) -> Result<CommitWatcher, StoreError> {
        Ok(CommitWatcher {
            conn: store.dedicated_connection().await?,
            last: None,
        })
    }

    /// True when some other connection committed since the previous call (and on the
    /// first call).
    pub async fn changed(&mut self) -> Result<bool, StoreError> {
        let (version,): (i64,) = sqlx::query_as("PRAGMA data_version")
            .fetch_one(&mut self.conn)
            .await?;
        let changed = self.last != Some(version);
        self.last = Some(version);
        Ok(changed)
    }
}
