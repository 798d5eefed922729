//! Leases of the rows this daemon works on: which rows it holds, their renewal every third
//! of the lease (River's producer keeps its jobs' heartbeats the same way), and the check
//! right before a row that waited is sent.
//!
//! A renewal that changes nothing means the lease was lost: the row expired and belongs to
//! another claim. The call in flight goes on (it cannot be taken back), but its result is
//! not written as if the row were still held; it is logged and counted instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::maintenance_failed;
use crate::clock::Clock;
use crate::store::driver::QueueStore as _;
use crate::store::driver::{HeldParams, RenewParams};
use crate::store::rows::ClaimMeta;
use crate::store::{Database, QueueName};

/// The rows a worker holds, by id: the claim token each was claimed under, and whether its
/// lease was found lost. Cloning shares the same set.
#[derive(Debug, Clone, Default)]
pub struct HeldRows {
    rows: Arc<Mutex<HashMap<i64, Hold>>>,
    /// Told when a row is held, so that the renewal of an idle worker needs no timer.
    held: Arc<tokio::sync::Notify>,
}

#[derive(Debug)]
struct Hold {
    token: String,
    lost: bool,
    /// The call is over and its result is with the completer, which reports a lost claim
    /// itself when the write finds the row gone.
    awaiting_write: bool,
}

impl HeldRows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Hold>> {
        // A poisoned map only means a task panicked mid-insert; the data is still usable.
        self.rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a row claimed under `token`.
    pub fn hold(&self, id: i64, token: &str) {
        let token = token.to_string();
        let hold = Hold {
            token,
            lost: false,
            awaiting_write: false,
        };
        self.lock().insert(id, hold);
        self.held.notify_one();
    }

    /// Waits until some row is held (at once when one is).
    async fn wait_for_rows(&self) {
        if self.lock().is_empty() {
            self.held.notified().await;
        }
    }

    /// Forgets a row whose attempt ended; true when its lease was still held.
    pub fn let_go(&self, id: i64) -> bool {
        self.lock().remove(&id).is_some_and(|h| !h.lost)
    }

    /// Whether row `id`'s lease was found lost.
    pub fn is_lost(&self, id: i64) -> bool {
        self.lock().get(&id).is_some_and(|h| h.lost)
    }

    /// A guard for row `id`'s attempt: [`HoldGuard::done`] forgets the row when the attempt
    /// ends, and a panic forgets it too, so that a dead attempt's row is left to its lease
    /// instead of being renewed for as long as the daemon lives. An attempt cancelled at
    /// shutdown keeps the row held, to be put back with its attempt refunded.
    pub fn until_done(&self, id: i64) -> HoldGuard {
        HoldGuard {
            held: self.clone(),
            id,
        }
    }

    /// The rows whose lease is still held, with their tokens.
    pub fn alive(&self) -> Vec<(i64, String)> {
        self.lock()
            .iter()
            .filter(|(_, h)| !h.lost)
            .map(|(id, h)| (*id, h.token.clone()))
            .collect()
    }

    /// Empties the set, returning the rows still held whose call never ended (to be put
    /// back at shutdown). A row whose result is still unwritten is not among them: its
    /// call was made, so it is not put back as if it had not been.
    pub fn take_alive(&self) -> Vec<(i64, String)> {
        self.lock()
            .drain()
            .filter(|(_, h)| !h.lost && !h.awaiting_write)
            .map(|(id, h)| (id, h.token))
            .collect()
    }

    /// Marks row `id`'s lease lost; true when that is news to report: false when the row
    /// is no longer held (its attempt ended while the renewal ran, so nothing was lost) or
    /// when its result is with the completer (whose write reports the loss).
    fn mark_lost(&self, id: i64) -> bool {
        match self.lock().get_mut(&id) {
            Some(h) => {
                h.lost = true;
                !h.awaiting_write
            }
            None => false,
        }
    }
}

/// Forgets its row when the attempt is done or panics (see [`HeldRows::until_done`]).
#[derive(Debug)]
pub struct HoldGuard {
    held: HeldRows,
    id: i64,
}

impl HoldGuard {
    /// The attempt ended: the row is no longer held.
    pub fn done(self) {
        // Drop does the work when panicking only; here the attempt ended normally.
        self.held.let_go(self.id);
    }

    /// The attempt ended and its result goes to the completer: the row stays held (its
    /// lease renewed, and so out of every rescuer's reach) until the returned guard is
    /// dropped, once the result is written or given up on.
    pub fn until_written(self) -> Unwritten {
        if let Some(h) = self.held.lock().get_mut(&self.id) {
            h.awaiting_write = true;
        }
        Unwritten {
            held: self.held.clone(),
            id: self.id,
        }
    }
}

/// A finished attempt's row whose result is not written yet (see
/// [`HoldGuard::until_written`]). After a database outage longer than the lease, this is
/// what keeps the daemon's own rescuer from handing the row to another attempt, which would
/// send it again, before the completer gets its result in.
#[derive(Debug)]
pub struct Unwritten {
    held: HeldRows,
    id: i64,
}

impl Drop for Unwritten {
    fn drop(&mut self) {
        self.held.let_go(self.id);
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.held.let_go(self.id);
        }
    }
}

/// Counts a claim this daemon lost (`invoice_worker_lost_claims_total`).
pub fn count_lost(queue: QueueName) {
    metrics::counter!("invoice_worker_lost_claims_total", "queue" => queue.as_str()).increment(1);
}

/// Renews the leases of `held` rows every third of `lease` until `stop`.
pub async fn keep_renewed(
    store: Database,
    queue: QueueName,
    lease: Duration,
    clock: Clock,
    held: HeldRows,
    stop: CancellationToken,
) {
    let every = (lease / 3).max(Duration::from_millis(200));
    loop {
        // An idle worker holds nothing to renew: no timer until it claims a row.
        tokio::select! {
            _ = held.wait_for_rows() => {}
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        renew_once(&store, queue, lease, &clock, &held).await;
    }
}

/// `held`'s leases extended by `lease` from now.
fn renewal<'a>(
    queue: QueueName,
    held: &'a [(i64, String)],
    lease: Duration,
    clock: &Clock,
) -> RenewParams<'a> {
    RenewParams {
        rows: HeldParams {
            queue,
            held,
            now: clock.now_ms(),
        },
        lease_until: clock.after(lease),
    }
}

/// One renewal round: extends every held row's lease, and marks those whose lease is gone.
pub async fn renew_once(
    store: &Database,
    queue: QueueName,
    lease: Duration,
    clock: &Clock,
    held: &HeldRows,
) {
    // Only rows whose task is alive: a row whose task ended without a result is left to
    // its lease, and so to the rescue.
    let alive = held.alive();
    match store
        .renew_leases(renewal(queue, &alive, lease, clock))
        .await
    {
        Ok(renewed) => {
            for ((id, _), ok) in alive.iter().zip(renewed) {
                // A row whose attempt ended meanwhile was written or let go, not lost.
                if !ok && held.mark_lost(*id) {
                    count_lost(queue);
                    tracing::warn!(
                        queue = queue.as_str(),
                        row_id = id,
                        "lease lost during the call (this process was frozen or starved past it, and another claim holds the row now): its result will not be written"
                    );
                }
            }
        }
        Err(e) => maintenance_failed(queue, "lease renewal", &e),
    }
}

/// Renews one claimed row's lease right before it is sent; false when the claim was lost
/// (or cannot be confirmed), logged and counted. `waited` is how long it waited.
pub async fn renew_before_sending(
    store: &Database,
    queue: QueueName,
    meta: &ClaimMeta,
    lease: Duration,
    clock: &Clock,
    waited: Duration,
) -> bool {
    let row = [(meta.id, meta.claim_token.clone())];
    let why = match store.renew_leases(renewal(queue, &row, lease, clock)).await {
        Ok(renewed) if renewed.first() == Some(&true) => return true,
        Ok(_) => "its lease expired while it waited (this process was frozen or starved) and it belongs to another claim now",
        Err(_) => "its lease could not be confirmed (the database did not answer)",
    };
    tracing::warn!(
        queue = queue.as_str(),
        row_id = meta.id,
        waited_ms = waited.as_millis() as u64,
        "row not sent: {why}"
    );
    count_lost(queue);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{claim_rebill, insert_due, temp_store};

    #[test]
    fn lost_rows_are_neither_renewed_nor_released() {
        let held = HeldRows::default();
        held.hold(1, "a");
        held.hold(2, "b");
        assert!(held.mark_lost(2));
        assert!(held.is_lost(2) && !held.is_lost(1));
        assert!(!held.mark_lost(9), "a row not held cannot be lost");
        assert_eq!(held.alive(), vec![(1, "a".to_string())]);
        assert!(!held.let_go(2), "a lost row is reported as lost");
        assert!(held.let_go(1));
        assert!(!held.let_go(1), "a row let go is no longer held");
        held.hold(3, "c");
        assert_eq!(held.take_alive(), vec![(3, "c".to_string())]);
        assert!(held.alive().is_empty());
        held.hold(4, "d");
        let guard = held.until_done(4);
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _guard = guard;
            panic!("a bug in the attempt");
        }));
        assert!(ended.is_err());
        assert!(
            held.alive().is_empty(),
            "a panicking attempt's row stays held"
        );
        held.hold(5, "e");
        drop(held.until_done(5));
        assert_eq!(
            held.alive(),
            vec![(5, "e".to_string())],
            "a cancelled attempt's row is kept, to be put back"
        );
        held.until_done(5).done();
        assert!(held.alive().is_empty());
    }

    #[test]
    fn a_row_stays_held_until_its_result_is_written() {
        let held = HeldRows::default();
        held.hold(1, "a");
        held.hold(2, "b");
        let unwritten = held.until_done(1).until_written();
        let mut alive = held.alive();
        alive.sort();
        assert_eq!(
            alive,
            vec![(1, "a".to_string()), (2, "b".to_string())],
            "an unwritten result's lease is still renewed"
        );
        assert!(
            !held.mark_lost(1),
            "the completer, not the renewal, reports a lost unwritten row"
        );
        assert!(held.is_lost(1));
        drop(unwritten);
        assert!(!held.is_lost(1), "written (or given up on): let go");
        let unwritten = held.until_done(2).until_written();
        assert!(
            held.take_alive().is_empty(),
            "a row whose call was made is never put back as unsent"
        );
        drop(unwritten);
        assert!(held.alive().is_empty());
    }

    /// A lease judged by the clock passed in: no sleeping. A row renewed in time stays
    /// held; one rescued by another daemon after its lease ran out is found lost.
    #[tokio::test]
    async fn a_renewal_that_changes_nothing_marks_the_row_lost() {
        let (_db, store) = temp_store().await;
        let clock = Clock::manual(1_000_000);
        insert_due(&store, &["KEPT", "LOST"]).await;
        let lease = Duration::from_secs(30);
        let batch = claim_rebill(&store, clock.now_ms(), 2, lease, "tok").await;
        let held = HeldRows::default();
        for c in &batch.rows {
            held.hold(c.meta.id, &c.meta.claim_token);
        }
        let lost_id = batch
            .rows
            .iter()
            .find(|c| c.row.orderno == "LOST")
            .map(|c| c.meta.id)
            .unwrap();

        let db: Database = store.clone().into();
        // Twenty seconds on: both renewed, both still held.
        clock.advance(Duration::from_secs(20));
        renew_once(&db, QueueName::Rebill, lease, &clock, &held).await;
        assert_eq!(held.alive().len(), 2);

        // The LOST row's lease runs out (this process froze) and another daemon rescues it.
        sqlx::query("UPDATE rebill_orders SET lease_expires_at = 0 WHERE id = ?1")
            .bind(lost_id)
            .execute(store.pool())
            .await
            .unwrap();
        clock.advance(Duration::from_secs(20));
        let rescued = store
            .rescue_expired(QueueName::Rebill, clock.now_ms(), 50)
            .await
            .unwrap();
        assert_eq!(rescued, 1);
        renew_once(&db, QueueName::Rebill, lease, &clock, &held).await;
        let alive: Vec<i64> = held.alive().into_iter().map(|(id, _)| id).collect();
        assert_eq!(alive.len(), 1);
        assert!(!alive.contains(&lost_id));
        assert!(!held.let_go(lost_id));
        let (until,): (i64,) =
            sqlx::query_as("SELECT lease_expires_at FROM rebill_orders WHERE id = ?1")
                .bind(alive[0])
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(
            until,
            clock.after(lease),
            "renewed from the clock passed in"
        );
    }
}
