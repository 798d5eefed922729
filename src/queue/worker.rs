//! The producer loop every queue runs (River's producer): claim as many due rows as there
//! are free slots and start an [`attempt`] for each; beside it run the
//! completer, the lease renewal and the rescuer, one task per concern. On shutdown it stops
//! claiming, lets calls finish within the grace period and puts unfinished rows back.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{Quota, RateLimiter};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::store::claim::ClaimParams;
use crate::store::driver::HeldParams;
use crate::store::driver::QueueStore as _;
use crate::store::rows::QueueRow;
use crate::store::{Database, QueueName, StoreError};

pub use super::attempt::Handler;
use super::attempt::{self, AttemptContext};
use super::backoff::Backoff;
use super::heartbeat::{Heartbeat, WriteHealth};
use super::leases::{self, HeldRows};
use super::pause_gate::PauseGate;
use super::rescue::{self, OwnLeases, RescueSettings};

/// Settings of one queue's worker, with named defaults in `config`.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// This daemon instance, recorded with its claims for lease renewal.
    pub instance: String,
    /// Lease length; renewed every third of it.
    pub lease: Duration,
    /// Most rows per claim transaction.
    pub claim_batch: u32,
    /// Requests in flight at once.
    pub max_in_flight: u32,
    /// Requests started per second.
    pub rate_per_second: u32,
    /// How long in-flight calls may run on after shutdown is requested.
    pub shutdown_grace: Duration,
    /// Retry policy.
    pub backoff: Backoff,
    /// The time leases, due times and backoff are judged by.
    pub clock: Clock,
}

/// How soon a claim that met a busy database is tried again.
const BUSY_RETRY: Duration = Duration::from_millis(20);

/// How long claims may keep meeting a busy database before that counts as a failure.
const BUSY_PATIENCE: Duration = Duration::from_secs(30);

/// How long a stopping worker waits for its last results (and the release of unfinished
/// rows) to be written.
const STOP_WRITE_LIMIT: Duration = Duration::from_secs(5);

/// How often a loop that waits for anything but new work (a free slot, a Retry-After hold,
/// a failing store) goes round and beats its heartbeat, which the watchdog and `/healthz`
/// judge it by. A loop idle for lack of work tells the heartbeat until when it waits instead.
const IDLE_TICK: Duration = Duration::from_secs(2);

/// How long an idle loop goes without asking the database when nothing woke it: commits
/// are announced by the store's commit watcher and due times are known, so this look is
/// only a safety net; rows held by a pause are looked at every [`IDLE_TICK`].
const SAFETY_LOOK: Duration = Duration::from_secs(30);

/// One queue's worker.
pub struct Worker<H: Handler> {
    store: Database,
    handler: Arc<H>,
    settings: WorkerSettings,
    heartbeat: Heartbeat,
    wake: watch::Receiver<u64>,
    /// False once the commit watcher is gone, so the idle wait stops asking it.
    watching: bool,
    /// Whether the completer manages to write results.
    writes: WriteHealth,
}

impl<H: Handler> Worker<H> {
    /// A worker for `H`'s queue; `wake` ticks when another connection commits.
    pub fn new(
        store: Database,
        handler: Arc<H>,
        settings: WorkerSettings,
        wake: watch::Receiver<u64>,
    ) -> Self {
        Worker {
            store,
            handler,
            heartbeat: Heartbeat::new(settings.clock.clone()),
            writes: WriteHealth::new(settings.clock.clone()),
            settings,
            wake,
            watching: true,
        }
    }

    /// The heartbeat of the claim loop (watchdog and health).
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Whether results are being written (watchdog and health).
    pub fn write_health(&self) -> WriteHealth {
        self.writes.clone()
    }

    /// Runs until `shutdown` is cancelled, then drains as described in the module doc.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let queue = H::Row::QUEUE;
        let s = self.settings.clone();
        let (tx, rx) = mpsc::channel(4096);
        let mut completer = tokio::spawn(super::completer::run(
            self.store.clone(),
            queue,
            rx,
            self.writes.clone(),
        ));
        // Set while claims fail: the heartbeat then stops, so `/healthz` and the watchdog
        // see a store that cannot take the work (a full disk, say) instead of a loop that
        // merely goes round.
        let mut claims_failing = false;
        // Since when claims meet a busy database (and whether the last one did).
        let (mut busy_since, mut claim_was_busy) = (Instant::now(), false);
        let clock = s.clock.clone();
        let services_stop = CancellationToken::new();
        let held = HeldRows::default();
        let pause_gate = PauseGate::default();
        let renewal = tokio::spawn(leases::keep_renewed(
            self.store.clone(),
            queue,
            s.lease,
            clock.clone(),
            held.clone(),
            services_stop.clone(),
        ));
        let rescuer = tokio::spawn(rescue::run(
            self.store.clone(),
            queue,
            RescueSettings {
                every: (s.lease / 3).max(Duration::from_millis(200)),
                max_attempts: s.backoff.max_attempts,
                own: Some(OwnLeases {
                    held: held.clone(),
                    lease: s.lease,
                    clock: clock.clone(),
                }),
            },
            clock.clone(),
            services_stop.clone(),
        ));

        let slots = Arc::new(Semaphore::new(s.max_in_flight as usize));
        let rate = NonZeroU32::new(s.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let limiter = Arc::new(RateLimiter::direct(Quota::per_second(rate)));
        let hold_until = Arc::new(AtomicI64::new(0));
        let instance: Arc<str> = Arc::from(s.instance.as_str());
        let mut tasks = JoinSet::new();

        tracing::info!(
            queue = queue.as_str(),
            max_in_flight = s.max_in_flight,
            rate_per_second = s.rate_per_second,
            "worker started"
        );
        loop {
            if !claims_failing {
                self.heartbeat.beat();
            }
            while tasks.try_join_next().is_some() {}
            if shutdown.is_cancelled() {
                break;
            }
            // A 429/503 with Retry-After holds the whole queue, not just that row.
            let hold = hold_until.load(Ordering::Relaxed) - clock.now_ms();
            if hold > 0 {
                let nap = Duration::from_millis(hold as u64).min(IDLE_TICK);
                tokio::select! {
                    _ = tokio::time::sleep(nap) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = tokio::time::sleep(IDLE_TICK) => continue,
                _ = shutdown.cancelled() => break,
            };
            let mut permits = vec![first];
            while permits.len() < s.claim_batch as usize {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            // After the slot: the attempt that freed it closed the gate before it did.
            if !pause_gate.is_open() {
                drop(permits);
                tokio::select! {
                    _ = pause_gate.opened() => {}
                    _ = tokio::time::sleep(IDLE_TICK) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let token = uuid::Uuid::new_v4().simple().to_string();
            let params = ClaimParams {
                now: clock.now_ms(),
                limit: permits.len() as u32,
                lease: s.lease,
                claim_token: &token,
                claimed_by: &s.instance,
            };
            if !claim_was_busy {
                busy_since = Instant::now();
            }
            let now = params.now;
            let claimed = self
                .store
                .claim::<H::Row>(&params, |pauses| super::pauses::claim_plan(pauses, now))
                .await;
            claim_was_busy = matches!(&claimed, Err(e) if e.is_busy());
            let batch = match claimed {
                Ok(batch) => {
                    tracing::debug!(
                        queue = queue.as_str(),
                        asked = params.limit,
                        claimed = batch.rows.len(),
                        "claimed"
                    );
                    if claims_failing {
                        tracing::info!(queue = queue.as_str(), "claims work again");
                    }
                    claims_failing = false;
                    batch
                }
                Err(e) if e.is_busy() && busy_since.elapsed() < BUSY_PATIENCE => {
                    // Writers of other processes held the lock past the busy timeout: not
                    // an error, just look again at once.
                    tracing::debug!(queue = queue.as_str(), error = %e, "claim met a busy database; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(BUSY_RETRY) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
                Err(e) => {
                    tracing::error!(queue = queue.as_str(), error = %e, "claim failed; retrying shortly");
                    claims_failing = true;
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(IDLE_TICK) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            if batch.rows.is_empty() {
                drop(permits);
                let nap = self.idle_nap(queue, batch.held_by_pause).await;
                if !self.wait_idle(nap, &shutdown).await {
                    break;
                }
                continue;
            }
            let claimed_at = Instant::now();
            for (claimed, permit) in batch.rows.into_iter().zip(permits) {
                held.hold(claimed.meta.id, &claimed.meta.claim_token);
                tasks.spawn(attempt::run(
                    AttemptContext {
                        handler: self.handler.clone(),
                        store: self.store.clone(),
                        backoff: s.backoff.clone(),
                        lease: s.lease,
                        clock: clock.clone(),
                        claimed_at,
                        limiter: limiter.clone(),
                        hold_until: hold_until.clone(),
                        held: held.clone(),
                        tx: tx.clone(),
                        pause_gate: pause_gate.clone(),
                        queue,
                        shutdown: shutdown.clone(),
                        instance: instance.clone(),
                    },
                    claimed,
                    permit,
                ));
            }
        }

        tracing::info!(queue = queue.as_str(), in_flight = tasks.len(), grace = ?s.shutdown_grace, "stopping: no new claims; waiting for calls in flight");
        let drained = tokio::time::timeout(s.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                queue = queue.as_str(),
                unfinished = tasks.len(),
                "grace period over; abandoning calls still in flight"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        drop(tx);
        // Results of finished calls are written before unfinished rows are put back, so a
        // finished row is never released by mistake (release is guarded by the token). A
        // store that cannot write (a full disk) must not hold the exit up: what is not
        // written within the limit is left to the lease, and the rows are sent again.
        if tokio::time::timeout(STOP_WRITE_LIMIT, &mut completer)
            .await
            .is_err()
        {
            completer.abort();
            tracing::warn!(
                queue = queue.as_str(),
                limit = ?STOP_WRITE_LIMIT,
                "results could not be written before exiting; their rows return to pending when their lease expires"
            );
        }
        let leftover = held.take_alive();
        match tokio::time::timeout(
            STOP_WRITE_LIMIT,
            self.store.release(HeldParams {
                queue,
                held: &leftover,
                now: clock.now_ms(),
            }),
        )
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(released)) => tracing::info!(
                queue = queue.as_str(),
                released,
                "unfinished rows returned to pending; their attempt was not counted"
            ),
            Ok(Err(e)) => tracing::warn!(queue = queue.as_str(), error = %e, rows = leftover.len(),
                "cannot return unfinished rows; they return to pending when their lease expires"),
            Err(_) => tracing::warn!(queue = queue.as_str(), rows = leftover.len(),
                "returning unfinished rows timed out; they return to pending when their lease expires"),
        }
        services_stop.cancel();
        let _ = renewal.await;
        let _ = rescuer.await;
        Ok(())
    }

    /// How long to sleep when nothing could be claimed: until the next row is due, at most
    /// [`SAFETY_LOOK`], or at most a tick while due rows are held by a pause.
    async fn idle_nap(&self, queue: QueueName, held_by_pause: bool) -> Duration {
        let cap = if held_by_pause {
            IDLE_TICK
        } else {
            SAFETY_LOOK
        };
        let now = self.settings.clock.now_ms();
        match self.store.next_due_after(queue, now).await {
            Ok(Some(at)) => Duration::from_millis((at - now).max(0) as u64).min(cap),
            Ok(None) => cap,
            Err(_) => IDLE_TICK,
        }
    }

    /// Sleeps for `nap` or until a commit wakes the loop; false when shutdown came first.
    /// The heartbeat knows the loop waits idle until then, so nothing wakes it meanwhile.
    async fn wait_idle(&mut self, nap: Duration, shutdown: &CancellationToken) -> bool {
        let until = tokio::time::Instant::now() + nap;
        self.heartbeat.idle_until(self.settings.clock.after(nap));
        let woken = loop {
            tokio::select! {
                changed = self.wake.changed(), if self.watching => match changed {
                    Ok(()) => break true,
                    // The commit watcher is gone (it only ends at shutdown): timer only.
                    Err(_) => self.watching = false,
                },
                _ = tokio::time::sleep_until(until) => break true,
                _ = shutdown.cancelled() => break false,
            }
        };
        self.heartbeat.not_idle();
        woken
    }
}
