//! Wake-ups on PostgreSQL: the queue tables' statement-level insert trigger notifies the
//! `invoice_worker` channel once per inserting statement; a dedicated connection LISTENs
//! and ticks the workers' wake channel. A poll every `fallback_poll` covers what no
//! notification announces (a row whose backoff ended, a notification lost with a
//! connection). A lost connection is LISTENed again as soon as the server answers, and the
//! workers are woken then, since rows may have arrived meanwhile.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::PgStore;
use crate::store::watch::{CommitWatch, WatchMode};
use crate::store::StoreError;

/// The channel the insert triggers notify (`migrations/postgres/`).
pub const CHANNEL: &str = "invoice_worker";

/// The first wait before LISTENing again after a failure; doubled up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl PgStore {
    /// Starts listening for inserts (one listener serves every worker of the process).
    /// Fails only when the first LISTEN fails; later losses are recovered from inside.
    pub async fn watch_commits(
        &self,
        fallback_poll: Duration,
        stop: CancellationToken,
    ) -> Result<CommitWatch, StoreError> {
        let listener = self.listen().await?;
        tracing::info!(database = %self.url(), channel = CHANNEL, "noticing new rows through LISTEN/NOTIFY");
        let (tx, wake) = watch::channel(0u64);
        let store = self.clone();
        let task = tokio::spawn(async move {
            store.follow(listener, fallback_poll, tx, stop).await;
        });
        Ok(CommitWatch {
            wake,
            mode: WatchMode::Listen(fallback_poll),
            task,
        })
    }

    async fn listen(&self) -> Result<PgListener, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        // A listener that reconnected by itself would LISTEN again unseen; this one reports
        // a lost connection instead, so that the workers are woken once it is back.
        listener.ignore_pool_close_event(true);
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }

    async fn follow(
        &self,
        mut listener: PgListener,
        fallback_poll: Duration,
        tx: watch::Sender<u64>,
        stop: CancellationToken,
    ) {
        let tick = || tx.send_modify(|n| *n = n.wrapping_add(1));
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = tokio::time::sleep(fallback_poll) => {
                    tick();
                    continue;
                }
                _ = stop.cancelled() => return,
            };
            match received {
                Ok(Some(_)) => tick(),
                Ok(None) | Err(_) => {
                    tracing::warn!(database = %self.url(), "lost the LISTEN connection; listening again");
                    match self.listen_again(&stop).await {
                        Some(again) => listener = again,
                        None => return,
                    }
                    tracing::info!(database = %self.url(), "listening again for new rows");
                    tick();
                }
            }
        }
    }

    /// LISTENs on a new connection, waiting longer between failures; `None` once stopped.
    async fn listen_again(&self, stop: &CancellationToken) -> Option<PgListener> {
        let mut pause = RETRY_FIRST;
        loop {
            match self.listen().await {
                Ok(listener) => return Some(listener),
                Err(e) => {
                    tracing::warn!(database = %self.url(), error = %e, retry_in = ?pause, "cannot LISTEN yet");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return None,
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::cluster;

    /// Waits (generously: this is about whether, not how fast) for the wake channel to move
    /// past `seen`; its new value.
    async fn woken_after(wake: &mut watch::Receiver<u64>, seen: u64) -> u64 {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if *wake.borrow_and_update() != seen {
                    return *wake.borrow();
                }
                wake.changed().await.expect("watcher alive");
            }
        })
        .await
        .expect("no wake-up within 30 s")
    }

    async fn insert(store: &PgStore, orderno: &str) {
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES ($1, 'X')")
            .bind(orderno)
            .execute(store.pool())
            .await
            .expect("insert");
    }

    #[tokio::test]
    async fn an_insert_wakes_the_workers_and_a_lost_connection_is_listened_again() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let store = cluster.scratch_store().await.expect("store");
        let stop = CancellationToken::new();
        // No fallback poll within the test: every wake-up is a notification or a re-LISTEN.
        let mut watch = store
            .watch_commits(Duration::from_secs(3600), stop.clone())
            .await
            .expect("watch");
        assert_eq!(watch.mode, WatchMode::Listen(Duration::from_secs(3600)));
        let seen = *watch.wake.borrow_and_update();
        insert(&store, "L-1").await;
        let seen = woken_after(&mut watch.wake, seen).await;

        // The server ends the listening connection (as a restart or a reset would).
        let (killed,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN%') k",
        )
        .fetch_one(store.pool())
        .await
        .expect("terminate");
        assert_eq!(killed, 1, "the listener's connection");
        // Woken once listening again (rows may have come meanwhile) ...
        let seen = woken_after(&mut watch.wake, seen).await;
        // ... and by the next insert's notification.
        insert(&store, "L-2").await;
        woken_after(&mut watch.wake, seen).await;

        stop.cancel();
        watch.task.await.expect("the watcher ends when stopped");
        store.close().await;
    }
}
