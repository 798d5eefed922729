//! Queue depths for `/metrics`, systemd's `STATUS=` and the console, counted by the daemon
//! in the background so that no request counts rows. Active rows (pending, running) are
//! counted through their partial indexes; finished rows cost O(rows) to count, so each kind
//! is counted again only after a pause of at least 500 times what counting it cost (at most
//! 0.2 % of a core, however big the tables grow; never more than 5 minutes apart).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::admin::{PauseInfo, QueueCounts};
use crate::store::driver::QueueStore as _;
use crate::store::{Database, QueueName, StoreError};

/// The shortest time between two counts of the same kind.
const EVERY: Duration = Duration::from_secs(2);

/// A count may take at most this share of the time (1/500 = 0.2 %).
const COST_FACTOR: u32 = 500;

/// The longest time between two counts of the same kind, however costly counting was.
const MOST: Duration = Duration::from_secs(300);

/// The cost of a kind of count, as the least of its last three: a count measured in wall
/// time that the machine stalled (a loaded host, a busy runtime, a cold first connection)
/// must not hold the next one off for 500 times the stall. One sample on its own once made
/// a test's finished counts wait over 20 s on a loaded CI machine.
#[derive(Debug, Default)]
struct Cost {
    recent: [Duration; 3],
    next: usize,
}

impl Cost {
    /// Records a count's cost; the pause before the next count of its kind.
    fn pause_after(&mut self, cost: Duration) -> Duration {
        self.recent[self.next] = cost;
        self.next = (self.next + 1) % self.recent.len();
        let least = self.recent.iter().min().copied().unwrap_or_default();
        EVERY.max(least * COST_FACTOR).min(MOST)
    }
}

/// The latest counts of every queue, and the pauses.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Per queue: active counts as of `active_at`, finished counts as of `finished_at`.
    pub queues: Vec<QueueCounts>,
    /// Every pause row.
    pub pauses: Vec<PauseInfo>,
    /// When the active counts were taken, epoch ms (0 = never).
    pub active_at: i64,
    /// When the finished counts were taken, epoch ms (0 = never).
    pub finished_at: i64,
}

impl Snapshot {
    /// The counts of `queue`, if it was counted.
    pub fn queue(&self, queue: QueueName) -> Option<&QueueCounts> {
        self.queues.iter().find(|c| c.queue == queue.as_str())
    }
}

/// The daemon's shared, latest [`Snapshot`]; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Depths {
    latest: Arc<RwLock<Snapshot>>,
}

impl Depths {
    /// No counts yet.
    pub fn new() -> Depths {
        Depths::default()
    }

    /// A copy of the latest counts.
    pub fn latest(&self) -> Snapshot {
        match self.latest.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Counts the active rows and pauses at `now` (and the finished rows too when
    /// `finished`), publishes the result and sets the gauges. Returns how long each part
    /// took: (active, finished).
    pub async fn refresh(
        &self,
        store: &Database,
        now: i64,
        finished: bool,
    ) -> Result<(Duration, Duration), StoreError> {
        let previous = self.latest();
        let started = Instant::now();
        let mut queues = Vec::with_capacity(QueueName::ALL.len());
        for queue in QueueName::ALL {
            queues.push(store.active_counts(queue, now).await?);
        }
        let pauses = store.pauses(now).await?;
        let active_cost = started.elapsed();
        let started = Instant::now();
        let mut finished_at = previous.finished_at;
        for (queue, counts) in QueueName::ALL.into_iter().zip(&mut queues) {
            let done = if finished {
                store.finished_counts(queue).await?
            } else {
                previous
                    .queue(queue)
                    .map(|c| {
                        c.by_status
                            .iter()
                            .filter(|(s, _)| s != "pending" && s != "running")
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default()
            };
            counts.by_status.extend(done);
        }
        if finished {
            finished_at = now;
        }
        let finished_cost = started.elapsed();
        let snapshot = Snapshot {
            queues,
            pauses,
            active_at: now,
            finished_at,
        };
        set_gauges(&snapshot, now);
        match self.latest.write() {
            Ok(mut s) => *s = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
        Ok((
            active_cost,
            if finished {
                finished_cost
            } else {
                Duration::ZERO
            },
        ))
    }

    /// Keeps the counts fresh until `stop`: active rows every 2 s (or 500 times their cost),
    /// finished rows likewise by their own cost (the least of the last three, at most 5
    /// minutes apart). A failed count is logged and tried again.
    pub async fn run(self, store: Database, clock: crate::clock::Clock, stop: CancellationToken) {
        let mut finished_due = Instant::now();
        let (mut active_cost, mut finished_cost) = (Cost::default(), Cost::default());
        loop {
            let count_finished = Instant::now() >= finished_due;
            let pause = match self.refresh(&store, clock.now_ms(), count_finished).await {
                Ok((active, finished)) => {
                    if count_finished {
                        finished_due = Instant::now() + finished_cost.pause_after(finished);
                    }
                    active_cost.pause_after(active)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot count the queues; trying again");
                    EVERY
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Every status a row can have, in the order the gauges and tables show them.
pub const STATUSES: [&str; 6] = [
    "pending",
    "running",
    "done",
    "failed",
    "rejected",
    "cancelled",
];

/// Sets the depth, age, confirmation and pause gauges from `snapshot` taken at `now`.
fn set_gauges(snapshot: &Snapshot, now: i64) {
    for counts in &snapshot.queues {
        let queue = counts.queue;
        for status in STATUSES {
            metrics::gauge!("invoice_worker_queue_depth", "queue" => queue, "status" => status)
                .set(counts.count(status) as f64);
        }
        metrics::gauge!("invoice_worker_oldest_pending_age_seconds", "queue" => queue)
            .set(counts.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
        metrics::gauge!("invoice_worker_awaiting_confirmation", "queue" => queue)
            .set(counts.awaiting_confirmation as f64);
        let active = |whole: bool| {
            snapshot
                .pauses
                .iter()
                .filter(|p| {
                    p.queue == queue
                        && (p.scope == "*") == whole
                        && (p.until_at > now || p.probe_row_id.is_some())
                })
                .count() as f64
        };
        metrics::gauge!("invoice_worker_paused_sellers", "queue" => queue).set(active(false));
        metrics::gauge!("invoice_worker_queue_paused", "queue" => queue).set(active(true));
    }
}

/// Queue depth by status for both queues, formatted for systemd's `STATUS=`.
pub fn status_line(snapshot: &Snapshot) -> String {
    let mut parts = Vec::new();
    for c in &snapshot.queues {
        let awaiting = match c.awaiting_confirmation {
            0 => String::new(),
            n => format!(" ({n} awaiting confirmation)"),
        };
        parts.push(format!(
            "{}: {} pending{awaiting}, {} running, {} done, {} failed",
            c.queue,
            c.count("pending"),
            c.count("running"),
            c.count("done"),
            c.count("failed")
        ));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{accepted, claim_rebill, insert_due, temp_store};

    #[test]
    fn one_stalled_count_does_not_hold_the_next_off() {
        let mut cost = Cost::default();
        // A cold first count that took a second: the next one still comes after 2 s.
        assert_eq!(cost.pause_after(Duration::from_secs(1)), EVERY);
        assert_eq!(cost.pause_after(Duration::from_micros(300)), EVERY);
        // Counting is costly for good (a big table): 500 times, once every sample says so.
        assert_eq!(cost.pause_after(Duration::from_millis(20)), EVERY);
        assert_eq!(
            cost.pause_after(Duration::from_millis(20)),
            EVERY,
            "the 0.3 ms one is still recent"
        );
        assert_eq!(
            cost.pause_after(Duration::from_millis(20)),
            Duration::from_secs(10)
        );
        // And never more than five minutes apart.
        for _ in 0..3 {
            cost.pause_after(Duration::from_secs(30));
        }
        assert_eq!(cost.pause_after(Duration::from_secs(30)), MOST);
    }

    #[tokio::test]
    async fn finished_counts_are_kept_between_their_refreshes_and_active_ones_move() {
        let (_db, store) = temp_store().await;
        let ids = insert_due(&store, &["a", "b", "c"]).await;
        let depths = Depths::new();
        let now = 1_700_000_000_000;
        depths
            .refresh(&store.clone().into(), now, true)
            .await
            .expect("count");
        let first = depths.latest();
        let rebill = first.queue(QueueName::Rebill).expect("rebill counted");
        assert_eq!((rebill.count("pending"), rebill.count("done")), (3, 0));
        assert_eq!(first.finished_at, now);

        claim_rebill(&store, now, 1, Duration::from_secs(30), "tok").await;
        store
            .complete(QueueName::Rebill, &[accepted(ids[0], "tok", now)])
            .await
            .expect("complete");
        // Active rows only: the done count is the one taken before.
        depths
            .refresh(&store.clone().into(), now + 1, false)
            .await
            .expect("count");
        let second = depths.latest();
        let rebill = second.queue(QueueName::Rebill).expect("rebill counted");
        assert_eq!((rebill.count("pending"), rebill.count("done")), (2, 0));
        assert_eq!(second.finished_at, now);
        assert_eq!(second.active_at, now + 1);

        depths
            .refresh(&store.clone().into(), now + 2, true)
            .await
            .expect("count");
        let third = depths.latest();
        let rebill = third.queue(QueueName::Rebill).expect("rebill counted");
        assert_eq!((rebill.count("pending"), rebill.count("done")), (2, 1));
        assert_eq!(
            status_line(&third),
            "rebill: 2 pending, 0 running, 1 done, 0 failed; title: 0 pending, 0 running, 0 done, 0 failed"
        );
        // The same figures as the CLI's exact count.
        let exact = store
            .counts(QueueName::Rebill, now + 2)
            .await
            .expect("counts");
        for status in STATUSES {
            assert_eq!(exact.count(status), rebill.count(status), "{status}");
        }
    }

    #[tokio::test]
    async fn the_counts_walk_only_indexes_over_their_rows() {
        let (_db, store) = temp_store().await;
        for statement in [
            &store.sql(QueueName::Rebill).active_counts,
            &store.sql(QueueName::Rebill).finished_counts,
        ] {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {statement}"))
                    .bind(0_i64)
                    .fetch_all(store.pool())
                    .await
                    .expect("plan");
            let text: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
            assert!(
                text.iter()
                    .all(|step| !step.starts_with("SCAN rebill_orders") || step.contains("INDEX")),
                "{text:?}"
            );
        }
    }
}
