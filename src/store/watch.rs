//! Noticing commits made by other connections (other processes' inserts) at once, while an
//! idle daemon does nothing at all.
//!
//! Every commit in WAL mode writes the database's `-wal` file, so the kernel's file
//! notifications (inotify on the database's directory) say the moment one happened. The
//! watch is one-shot and re-armed after each wake-up, at most every `PACE` (5 ms): SQLite writes
//! the WAL a page at a time, and a watch left armed while the daemon drains would deliver
//! thousands of events a second for nobody (the workers are busy, not waiting). `PRAGMA data_version` on a connection of its own then
//! confirms that some other connection committed (it ignores a checkpoint, which writes the
//! database file but changes no data). File systems that cannot report changes made on
//! other hosts (NFS, SMB, FUSE) get a slow poll of `data_version` instead, logged once at
//! start. The wake-up sits behind the store: another backend brings its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::SqliteConnection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// How the watcher learns of commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// Kernel file notifications on the database's directory.
    Notifications,
    /// `PRAGMA data_version` every so often (no notifications on this file system).
    Polling(Duration),
    /// PostgreSQL's LISTEN/NOTIFY (fed by the tables' insert triggers), with a poll every
    /// so often for what a lost connection missed.
    Listen(Duration),
}

/// A running commit watcher: `wake` ticks after every commit of another connection.
pub struct CommitWatch {
    /// Ticks (its value changes) when another connection committed.
    pub wake: watch::Receiver<u64>,
    /// How commits are noticed.
    pub mode: WatchMode,
    /// The watcher task; it ends when `stop` is cancelled.
    pub task: tokio::task::JoinHandle<()>,
}

/// File system magic numbers (statfs `f_type`) whose files may change on another host
/// without this kernel knowing: inotify cannot be trusted there.
const REMOTE_FILE_SYSTEMS: &[i64] = &[
    0x6969,              // NFS
    0x517B,              // SMB
    0xFF53_4D42,         // CIFS
    0xFE53_4D42,         // SMB2
    0x6573_5546,         // FUSE
    0x0102_1997,         // 9P (v9fs)
    0x7461_636f,         // OCFS2
    0x0116_1970,         // GFS2
    0x0BD0_0BD0,         // Lustre
    0x0000_47504653_i64, // GPFS
];

/// Whether `dir` is on a file system whose changes inotify reports reliably.
fn notifications_are_reliable(dir: &Path) -> Result<(), String> {
    match nix::sys::statfs::statfs(dir) {
        Ok(fs) => {
            // `f_type` is a C long: i64 on the 64-bit Linux this daemon runs on.
            #[allow(clippy::useless_conversion)]
            let kind = i64::from(fs.filesystem_type().0);
            if REMOTE_FILE_SYSTEMS.contains(&kind) {
                Err(format!(
                    "file system type {kind:#x} is shared over the network"
                ))
            } else {
                Ok(())
            }
        }
        Err(e) => Err(format!("cannot stat the file system: {e}")),
    }
}

/// A one-shot inotify watch on the database's directory for writes to the `-wal` file. (Not
/// the database file: in WAL mode every commit writes the WAL, while the database file is
/// written by checkpoints, which change no data and would only wake the watcher.)
struct DirWatch {
    events: inotify::EventStream<[u8; 4096]>,
    dir: PathBuf,
    wal: std::ffi::OsString,
}

impl DirWatch {
    /// Sets up the watch (not yet armed).
    fn new(db: &Path) -> Result<DirWatch, String> {
        let dir = match db.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) => dir.to_path_buf(),
            None => PathBuf::from("."),
        };
        notifications_are_reliable(&dir)?;
        let mut wal = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        wal.push("-wal");
        let inotify = inotify::Inotify::init().map_err(|e| format!("cannot use inotify: {e}"))?;
        let events = inotify
            .into_event_stream([0u8; 4096])
            .map_err(|e| format!("cannot read inotify events: {e}"))?;
        let watch = DirWatch { events, dir, wal };
        watch.arm()?;
        Ok(watch)
    }

    /// Arms the watch for the next write; the kernel disarms it after one event.
    fn arm(&self) -> Result<(), String> {
        use inotify::WatchMask;
        self.events
            .watches()
            .add(
                &self.dir,
                WatchMask::MODIFY | WatchMask::CREATE | WatchMask::ONESHOT,
            )
            .map(|_| ())
            .map_err(|e| format!("cannot watch {}: {e}", self.dir.display()))
    }

    /// Waits for a write to one of the database's files. Events about other files in the
    /// directory re-arm the watch and go on waiting.
    async fn written(&mut self) -> Result<(), String> {
        use futures::StreamExt;
        loop {
            let event = match self.events.next().await {
                Some(Ok(event)) => event,
                Some(Err(e)) => return Err(format!("inotify read failed: {e}")),
                None => return Err("inotify stream ended".to_string()),
            };
            // A lost event (queue overflow) might have been ours.
            let ours = event.mask.contains(inotify::EventMask::Q_OVERFLOW)
                || event.name.as_ref().is_some_and(|n| *n == self.wal);
            if ours {
                return Ok(());
            }
            if event.mask.contains(inotify::EventMask::IGNORED) {
                // The one-shot watch went off on another file: look again.
                self.arm()?;
            }
        }
    }
}

/// The watcher task: waits for a write (or the poll), confirms a commit with
/// `data_version` and ticks `tx`.
async fn follow(
    mut conn: SqliteConnection,
    mut last: i64,
    mut mode: Mode,
    tx: watch::Sender<u64>,
    stop: CancellationToken,
) {
    // At start, as after every wake-up, a commit may already be on its way.
    let mut expecting = Some(Expectation::new(tokio::time::Instant::now()));
    loop {
        match &mut mode {
            Mode::Notifications(dir) => {
                // Armed before looking, so a commit between the look and the wait is seen.
                if let Err(why) = dir.arm() {
                    tracing::warn!(%why, "file notifications failed; polling the database instead");
                    mode = Mode::Polling(FALLBACK_AFTER_FAILURE);
                    continue;
                }
                let written = match &expecting {
                    // Nothing on its way: sleep until the next write.
                    None => tokio::select! {
                        written = dir.written() => written.map(|()| true),
                        _ = stop.cancelled() => return,
                    },
                    Some(expectation) => tokio::select! {
                        written = dir.written() => written.map(|()| true),
                        _ = tokio::time::sleep_until(expectation.next_look) => Ok(false),
                        _ = stop.cancelled() => return,
                    },
                };
                let now = tokio::time::Instant::now();
                match written {
                    Ok(true) => match &mut expecting {
                        Some(expectation) => expectation.written(now),
                        None => expecting = Some(Expectation::new(now)),
                    },
                    Ok(false) => {}
                    Err(why) => {
                        tracing::warn!(%why, "file notifications failed; polling the database instead");
                        mode = Mode::Polling(FALLBACK_AFTER_FAILURE);
                        continue;
                    }
                }
                match check(&mut conn, &mut last, &tx, &stop).await {
                    None => return,
                    Some(true) => {
                        // Workers are busy with this commit: announce the next one at the end
                        // of the pace. Writes meanwhile go unreported (the watch is not
                        // armed), so expect a commit afterwards.
                        tokio::select! {
                            _ = tokio::time::sleep(PACE) => {}
                            _ = stop.cancelled() => return,
                        }
                        expecting = Some(Expectation::new(tokio::time::Instant::now()));
                    }
                    Some(false) => {
                        if let Some(expectation) = &mut expecting {
                            if !expectation.looked(tokio::time::Instant::now()) {
                                expecting = None;
                            }
                        }
                    }
                }
            }
            Mode::Polling(every) => {
                tokio::select! {
                    _ = tokio::time::sleep(*every) => {}
                    _ = stop.cancelled() => return,
                }
                if check(&mut conn, &mut last, &tx, &stop).await.is_none() {
                    return;
                }
            }
        }
    }
}

/// How long `data_version` is watched after a write to the WAL (or after the pace) before
/// concluding that no commit is coming. The last write of a commit reaches the `-wal` file a
/// moment before the commit becomes visible (SQLite then updates the shared-memory index,
/// which the kernel does not report); on a busy machine the writing process can be
/// descheduled in between for a good part of a second. A write that never becomes a commit
/// (a rolled-back transaction that spilled its cache) costs a dozen cheap looks.
const EXPECT_FOR: Duration = Duration::from_secs(3);

/// The first look after a write is at once; each next one waits this many times longer.
const LOOK_BACKOFF: u32 = 3;

/// The longest wait between two looks while a commit is expected.
const LONGEST_LOOK_GAP: Duration = Duration::from_millis(500);

/// The schedule of `data_version` looks while a commit is expected: at once, then ever less
/// often, until [`EXPECT_FOR`] after the last write.
#[derive(Debug, Clone, Copy)]
struct Expectation {
    /// When to look next.
    next_look: tokio::time::Instant,
    /// The wait before the look after next.
    gap: Duration,
    /// When to give up: `EXPECT_FOR` after the last write.
    until: tokio::time::Instant,
}

impl Expectation {
    /// A commit is expected from `now` on.
    fn new(now: tokio::time::Instant) -> Expectation {
        Expectation {
            next_look: now,
            gap: Duration::from_millis(1),
            until: now + EXPECT_FOR,
        }
    }

    /// Another write arrived: its commit is the one expected now, from the first quick
    /// look on and for the whole window. (Keeping the earlier write's long gaps made a
    /// commit that became visible just after the look at its write wait for a look up to
    /// half a second later: 130–200 ms pickups while idle.)
    fn written(&mut self, now: tokio::time::Instant) {
        *self = Expectation::new(now);
    }

    /// A look found nothing at `now`: schedules the next one; false when it is time to stop
    /// expecting.
    fn looked(&mut self, now: tokio::time::Instant) -> bool {
        if now >= self.until {
            return false;
        }
        self.next_look = (now + self.gap).min(self.until);
        self.gap = (self.gap * LOOK_BACKOFF).min(LONGEST_LOOK_GAP);
        true
    }
}

/// How the watcher task learns of writes.
enum Mode {
    Notifications(Box<DirWatch>),
    Polling(Duration),
}

/// The shortest time between two wake-ups from notifications. A second commit within it is
/// announced at its end: the workers are busy with the first one meanwhile.
const PACE: Duration = Duration::from_millis(5);

/// The poll interval after notifications failed at run time.
const FALLBACK_AFTER_FAILURE: Duration = Duration::from_millis(250);

/// Asks `data_version`; ticks `tx` when it moved. `Some(true)` when it moved (or the query
/// failed: the loops are woken to find out for themselves), `None` when stopped meanwhile.
async fn check(
    conn: &mut SqliteConnection,
    last: &mut i64,
    tx: &watch::Sender<u64>,
    stop: &CancellationToken,
) -> Option<bool> {
    match data_version(conn).await {
        Ok(version) if version != *last => {
            *last = version;
            tx.send_modify(|v| *v = v.wrapping_add(1));
            Some(true)
        }
        Ok(_) => Some(false),
        Err(e) => {
            tracing::warn!(error = %e, "commit watcher query failed");
            tx.send_modify(|v| *v = v.wrapping_add(1));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => Some(true),
                _ = stop.cancelled() => None,
            }
        }
    }
}

/// `PRAGMA data_version` on the watcher's own connection.
async fn data_version(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    let (version,): (i64,) = sqlx::query_as("PRAGMA data_version")
        .fetch_one(conn)
        .await?;
    Ok(version)
}

impl Store {
    /// Starts watching for commits by other connections; `fallback_poll` is the poll
    /// interval on file systems without reliable notifications. One watcher serves every
    /// worker of the process.
    pub async fn watch_commits(
        &self,
        fallback_poll: Duration,
        stop: CancellationToken,
    ) -> Result<CommitWatch, StoreError> {
        let mut conn = self.dedicated_connection().await?;
        let last = data_version(&mut conn).await?;
        let (task_mode, mode) = match DirWatch::new(self.path()) {
            Ok(dir) => {
                tracing::info!(database = %self.path().display(), "noticing new rows through file notifications");
                (Mode::Notifications(Box::new(dir)), WatchMode::Notifications)
            }
            Err(why) => {
                tracing::warn!(database = %self.path().display(), %why, poll = ?fallback_poll,
                    "file notifications unavailable; polling the database for new rows instead");
                (
                    Mode::Polling(fallback_poll),
                    WatchMode::Polling(fallback_poll),
                )
            }
        };
        let (tx, wake) = watch::channel(0u64);
        let task = tokio::spawn(follow(conn, last, task_mode, tx, stop));
        Ok(CommitWatch { wake, mode, task })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    async fn insert_from_another_process_like_connection(path: &Path, orderno: &str) {
        use sqlx::{ConnectOptions, Connection};
        let mut writer = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("writer connection");
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES (?1, 'T')")
            .bind(orderno)
            .execute(&mut writer)
            .await
            .expect("insert");
        writer.close().await.expect("close");
    }

    #[tokio::test]
    async fn notices_another_connections_commit_within_milliseconds() {
        let (_dir, store) = temp_store().await;
        let stop = CancellationToken::new();
        let mut watch = store
            .watch_commits(Duration::from_secs(60), stop.clone())
            .await
            .expect("watcher");
        assert_eq!(watch.mode, WatchMode::Notifications);
        // How soon is the benchmark's business (pickup latency); this asserts only that a
        // commit wakes the watcher at all, long before its 60 s poll would.
        for i in 0..20 {
            watch.wake.mark_unchanged();
            insert_from_another_process_like_connection(store.path(), &format!("w{i}")).await;
            tokio::time::timeout(Duration::from_secs(30), watch.wake.changed())
                .await
                .expect("woken long before the 60 s poll")
                .expect("watcher alive");
        }
        stop.cancel();
        watch.task.await.expect("watcher stops");
    }

    #[test]
    fn a_write_is_followed_by_ever_rarer_looks_for_the_whole_window() {
        let start = tokio::time::Instant::now();
        let mut expectation = Expectation::new(start);
        assert_eq!(expectation.next_look, start, "the first look is at once");
        let mut now = start;
        let mut looks = 1;
        let mut gaps = Vec::new();
        while expectation.looked(now) {
            gaps.push(expectation.next_look - now);
            now = expectation.next_look;
            looks += 1;
        }
        assert!(now >= start + EXPECT_FOR, "looked until the window closed");
        // Ever longer gaps, except the last, which ends with the window.
        let growing = &gaps[..gaps.len() - 1];
        assert!(growing.windows(2).all(|w| w[0] <= w[1]), "{gaps:?}");
        assert!(gaps.iter().all(|g| *g <= LONGEST_LOOK_GAP), "{gaps:?}");
        assert!((5..=20).contains(&looks), "{looks} looks in {EXPECT_FOR:?}");
    }

    #[test]
    fn another_write_keeps_the_window_open() {
        let start = tokio::time::Instant::now();
        let mut expectation = Expectation::new(start);
        let late = start + EXPECT_FOR - Duration::from_millis(1);
        expectation.written(late);
        assert!(expectation.looked(start + EXPECT_FOR + Duration::from_millis(1)));
        assert!(!expectation.looked(late + EXPECT_FOR));
    }

    #[test]
    fn another_write_starts_the_quick_looks_again() {
        let start = tokio::time::Instant::now();
        let mut expectation = Expectation::new(start);
        let mut now = start;
        // Long after the first write, the looks are far apart.
        while now < start + Duration::from_millis(400) {
            assert!(expectation.looked(now));
            now = expectation.next_look;
        }
        assert!(
            expectation.gap >= Duration::from_millis(100),
            "{:?}",
            expectation.gap
        );
        // A new write: it is looked at once, and a look that misses its commit is followed
        // by another within milliseconds, not after the old gap.
        expectation.written(now);
        assert_eq!(expectation.next_look, now);
        assert!(expectation.looked(now));
        assert!(expectation.next_look - now <= Duration::from_millis(1));
    }

    #[tokio::test]
    async fn polls_when_notifications_are_unavailable() {
        // A directory that does not exist cannot be watched: the store falls back to polling.
        assert!(DirWatch::new(Path::new("/nonexistent-dir/q.db")).is_err());
        let (_dir, store) = temp_store().await;
        let mut conn = store.dedicated_connection().await.expect("connection");
        let last = data_version(&mut conn).await.expect("version");
        let (tx, mut wake) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let poll = Mode::Polling(Duration::from_millis(20));
        let task = tokio::spawn(follow(conn, last, poll, tx, stop.clone()));
        insert_from_another_process_like_connection(store.path(), "p1").await;
        tokio::time::timeout(Duration::from_secs(30), wake.changed())
            .await
            .expect("the poll sees the commit")
            .expect("watcher alive");
        stop.cancel();
        task.await.expect("watcher stops");
    }

    #[tokio::test]
    async fn a_checkpoint_alone_wakes_nobody() {
        let (_dir, store) = temp_store().await;
        insert_from_another_process_like_connection(store.path(), "c1").await;
        let stop = CancellationToken::new();
        let mut watch = store
            .watch_commits(Duration::from_secs(60), stop.clone())
            .await
            .expect("watcher");
        watch.wake.mark_unchanged();
        store.checkpoint().await.expect("checkpoint");
        let woken = tokio::time::timeout(Duration::from_millis(300), watch.wake.changed()).await;
        assert!(woken.is_err(), "a checkpoint changes no data");
        stop.cancel();
        watch.task.await.expect("watcher stops");
    }
}
