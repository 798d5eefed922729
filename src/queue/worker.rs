//! The worker loop every queue runs: claim as many due rows as there are free slots, send
//! each under the rate limit, plan its completion and hand it to the completer; renew
//! leases; rescue rows of dead daemons; on shutdown stop claiming, let calls finish within
//! the grace period and put unfinished rows back.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::store::claim::ClaimParams;
use crate::store::rows::{ClaimMeta, Claimed, QueueRow};
use crate::store::{now_ms, QueueName, Store, StoreError};

use super::action::{Action, Attempted};
use super::backoff::Backoff;
use super::decide::{plan, Processed};
use super::heartbeat::{Heartbeat, WriteHealth};
use crate::validate::invisible::escape_for_log;

/// What a queue plugs into the generic loop: how to handle one claimed row.
pub trait Handler: Send + Sync + 'static {
    /// The queue's row type.
    type Row: QueueRow;
    /// Completes a claimed row before it is sent (a title gets its serial here, so the
    /// attempt is logged under it). `Some` ends the attempt with that result.
    fn prepare(
        &self,
        claimed: &mut Claimed<Self::Row>,
    ) -> impl Future<Output = Option<Processed>> + Send {
        let _ = claimed;
        async { None }
    }

    /// Validates and sends one row. Never panics on bad data; a bad row is `Rejected`.
    fn process(&self, claimed: &Claimed<Self::Row>) -> impl Future<Output = Processed> + Send;
}

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
}

/// How soon a claim that met a busy database is tried again.
const BUSY_RETRY: Duration = Duration::from_millis(20);

/// How long claims may keep meeting a busy database before that counts as a failure.
const BUSY_PATIENCE: Duration = Duration::from_secs(30);

/// How long a stopping worker waits for its last results (and the release of unfinished
/// rows) to be written.
const STOP_WRITE_LIMIT: Duration = Duration::from_secs(5);

/// How often an idle loop beats its heartbeat (the watchdog and `/healthz` judge it by that).
const IDLE_TICK: Duration = Duration::from_secs(2);

/// How long an idle loop goes without asking the database when nothing woke it: commits
/// are announced by the store's commit watcher and due times are known, so this look is
/// only a safety net; rows held by a pause are looked at every [`IDLE_TICK`].
const SAFETY_LOOK: Duration = Duration::from_secs(30);

/// One queue's worker.
pub struct Worker<H: Handler> {
    store: Store,
    handler: Arc<H>,
    settings: WorkerSettings,
    heartbeat: Heartbeat,
    wake: watch::Receiver<u64>,
    /// False once the commit watcher is gone, so the idle wait stops asking it.
    watching: bool,
    /// Whether the completer manages to write results.
    writes: WriteHealth,
}

/// Rows this worker holds, so that shutdown can put unfinished ones back.
type Held = Arc<Mutex<HashMap<i64, String>>>;

impl<H: Handler> Worker<H> {
    /// A worker for `H`'s queue; `wake` ticks when another connection commits.
    pub fn new(
        store: Store,
        handler: Arc<H>,
        settings: WorkerSettings,
        wake: watch::Receiver<u64>,
    ) -> Self {
        Worker {
            store,
            handler,
            settings,
            heartbeat: Heartbeat::new(),
            wake,
            watching: true,
            writes: WriteHealth::default(),
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
        let leases_stop = CancellationToken::new();
        let held: Held = Arc::default();
        let leases = tokio::spawn(lease_keeper(
            self.store.clone(),
            queue,
            s.clone(),
            held.clone(),
            leases_stop.clone(),
        ));

        let slots = Arc::new(Semaphore::new(s.max_in_flight as usize));
        let rate = NonZeroU32::new(s.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let limiter = Arc::new(RateLimiter::direct(Quota::per_second(rate)));
        let hold_until = Arc::new(AtomicI64::new(0));
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
            let hold = hold_until.load(Ordering::Relaxed) - now_ms();
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
            let token = uuid::Uuid::new_v4().simple().to_string();
            let params = ClaimParams {
                now: now_ms(),
                limit: permits.len() as u32,
                lease: s.lease,
                claim_token: &token,
                claimed_by: &s.instance,
            };
            if !claim_was_busy {
                busy_since = Instant::now();
            }
            let claimed = self.store.claim::<H::Row>(&params).await;
            claim_was_busy = matches!(&claimed, Err(e) if e.is_busy());
            let batch = match claimed {
                Ok(batch) => {
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
                lock(&held).insert(claimed.meta.id, claimed.meta.claim_token.clone());
                tasks.spawn(attempt(
                    AttemptContext {
                        handler: self.handler.clone(),
                        store: self.store.clone(),
                        backoff: s.backoff.clone(),
                        lease: s.lease,
                        claimed_at,
                        limiter: limiter.clone(),
                        hold_until: hold_until.clone(),
                        held: held.clone(),
                        tx: tx.clone(),
                        queue,
                        shutdown: shutdown.clone(),
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
        let leftover: Vec<(i64, String)> = lock(&held).drain().collect();
        match tokio::time::timeout(
            STOP_WRITE_LIMIT,
            self.store.release(queue, &leftover, now_ms()),
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
        leases_stop.cancel();
        let _ = leases.await;
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
        let now = now_ms();
        match self.store.next_due_after(queue, now).await {
            Ok(Some(at)) => Duration::from_millis((at - now).max(0) as u64).min(cap),
            Ok(None) => cap,
            Err(_) => IDLE_TICK,
        }
    }

    /// Sleeps for `nap` or until a commit wakes the loop, beating the heartbeat every
    /// [`IDLE_TICK`] meanwhile; false when shutdown came first.
    async fn wait_idle(&mut self, nap: Duration, shutdown: &CancellationToken) -> bool {
        let until = tokio::time::Instant::now() + nap;
        loop {
            let tick = (tokio::time::Instant::now() + IDLE_TICK).min(until);
            tokio::select! {
                changed = self.wake.changed(), if self.watching => match changed {
                    Ok(()) => return true,
                    // The commit watcher is gone (it only ends at shutdown): ticks only.
                    Err(_) => self.watching = false,
                },
                _ = tokio::time::sleep_until(tick) => {}
                _ = shutdown.cancelled() => return false,
            }
            self.heartbeat.beat();
            if tick >= until {
                return true;
            }
        }
    }
}

/// Waits for the rate limiter and any Retry-After hold; false when shutdown came first.
async fn wait_for_turn<H: Handler>(ctx: &AttemptContext<H>) -> bool {
    tokio::select! {
        _ = ctx.limiter.until_ready() => {}
        _ = ctx.shutdown.cancelled() => return false,
    }
    loop {
        let hold = ctx.hold_until.load(Ordering::Relaxed) - now_ms();
        if hold <= 0 {
            return !ctx.shutdown.is_cancelled();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(hold as u64)) => {}
            _ = ctx.shutdown.cancelled() => return false,
        }
    }
}

/// Renews the lease of one claimed row right before it is sent; false when the claim was
/// lost (or cannot be confirmed), logged and counted.
async fn still_held<H: Handler>(ctx: &AttemptContext<H>, meta: &ClaimMeta) -> bool {
    let held = [(meta.id, meta.claim_token.clone())];
    let until = now_ms() + ctx.lease.as_millis() as i64;
    let why = match ctx.store.renew_leases(ctx.queue, &held, until).await {
        Ok(1) => return true,
        Ok(_) => "its lease expired while it waited (this process was frozen or starved) and it belongs to another claim now",
        Err(_) => "its lease could not be confirmed (the database did not answer)",
    };
    tracing::warn!(
        queue = ctx.queue.as_str(),
        row_id = meta.id,
        waited_ms = ctx.claimed_at.elapsed().as_millis() as u64,
        "row not sent: {why}"
    );
    metrics::counter!("invoice_worker_lost_claims_total", "queue" => ctx.queue.as_str())
        .increment(1);
    false
}

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<i64, String>> {
    // A poisoned map only means a task panicked mid-insert; the data is still usable.
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct AttemptContext<H: Handler> {
    handler: Arc<H>,
    store: Store,
    backoff: Backoff,
    lease: Duration,
    /// When the row was claimed: a row that waited long for its turn checks its lease first.
    claimed_at: Instant,
    limiter: Arc<DefaultDirectRateLimiter>,
    hold_until: Arc<AtomicI64>,
    held: Held,
    tx: mpsc::Sender<crate::store::complete::Completion>,
    queue: QueueName,
    shutdown: CancellationToken,
}

async fn attempt<H: Handler>(
    ctx: AttemptContext<H>,
    mut claimed: Claimed<H::Row>,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    // A row still waiting for its turn when shutdown comes is not sent: it stays in `held`
    // and goes back to pending with its attempt refunded.
    if !wait_for_turn(&ctx).await {
        return;
    }
    // A row that waited for its turn (the rate limit, a frozen or starved process) may have
    // lost its lease meanwhile, and another daemon may be sending it now: check, and renew,
    // before sending. A lost or unverifiable lease means the row is not sent; the lease
    // brings it back to whoever holds it now.
    if ctx.claimed_at.elapsed() > ctx.lease / 3 && !still_held(&ctx, &claimed.meta).await {
        lock(&ctx.held).remove(&claimed.meta.id);
        return;
    }
    let started = Instant::now();
    let handled = AssertUnwindSafe(async {
        match ctx.handler.prepare(&mut claimed).await {
            Some(processed) => processed,
            None => ctx.handler.process(&claimed).await,
        }
    })
    .catch_unwind()
    .await;
    // A bug must not leave the row `running` for as long as this daemon lives: it is
    // retried like any failure and, if it keeps panicking, runs out of attempts.
    let processed = handled.unwrap_or_else(|_| {
        tracing::error!(
            queue = ctx.queue.as_str(),
            row_id = claimed.meta.id,
            "internal error (panic) while handling the row"
        );
        Processed::Attempted(Attempted::transient(
            None,
            "internal error while handling the row; see the daemon log",
        ))
    });
    let elapsed = started.elapsed();
    let now = now_ms();
    let seller = claimed.row.seller();
    let completion = plan(
        &claimed.meta,
        &seller,
        &processed,
        &ctx.backoff,
        now,
        rand::random::<f64>(),
    );
    log_attempt(ctx.queue, &claimed, &processed, &completion, elapsed);

    if let Processed::Attempted(a) = &processed {
        if let (Action::Retry { after: Some(after) }, Some(429 | 503)) = (&a.action, a.http_status)
        {
            ctx.hold_until
                .fetch_max(now + after.as_millis() as i64, Ordering::Relaxed);
        }
        metrics::histogram!("invoice_worker_request_duration_seconds", "queue" => ctx.queue.as_str())
            .record(elapsed.as_secs_f64());
    }
    let id = claimed.meta.id;
    if ctx.tx.send(completion).await.is_err() {
        tracing::error!(
            queue = ctx.queue.as_str(),
            row_id = id,
            "completer stopped; result left to the lease"
        );
    }
    lock(&ctx.held).remove(&id);
}

/// Emits one attempt line at a level chosen at run time, with the queue's own names for
/// the order and seller fields (tracing needs both to be known at compile time).
macro_rules! attempt_event {
    ($level:expr, $queue:expr, $label:expr, $order:expr, $seller:expr, $($rest:tt)*) => {
        match ($level, $queue) {
            (tracing::Level::ERROR, QueueName::Rebill) => tracing::error!(queue = "rebill", orderno = %$order, tax_num = %$seller, $($rest)*),
            (tracing::Level::WARN, QueueName::Rebill) => tracing::warn!(queue = "rebill", orderno = %$order, tax_num = %$seller, $($rest)*),
            (_, QueueName::Rebill) => tracing::info!(queue = "rebill", orderno = %$order, tax_num = %$seller, $($rest)*),
            (tracing::Level::ERROR, QueueName::Title) => tracing::error!(queue = "title", ttqqlsh = %$label, order_no = %$order, sqm = %$seller, $($rest)*),
            (tracing::Level::WARN, QueueName::Title) => tracing::warn!(queue = "title", ttqqlsh = %$label, order_no = %$order, sqm = %$seller, $($rest)*),
            (_, QueueName::Title) => tracing::info!(queue = "title", ttqqlsh = %$label, order_no = %$order, sqm = %$seller, $($rest)*),
        }
    };
}

fn log_attempt<R: QueueRow>(
    queue: QueueName,
    claimed: &Claimed<R>,
    processed: &Processed,
    completion: &crate::store::complete::Completion,
    elapsed: Duration,
) {
    // Values written by other systems (and server messages) may hold characters that
    // reorder or hide the rest of the line (U+202E): shown escaped.
    let label = claimed.row.label();
    let label = escape_for_log(&label);
    let order = escape_for_log(claimed.row.order());
    let seller = claimed.row.seller();
    let seller = escape_for_log(&seller);
    let row_id = claimed.meta.id;
    let attempt = claimed.meta.attempts;
    let duration_ms = elapsed.as_millis() as u64;
    let status = completion.status.as_str();
    let reason = escape_for_log(completion.last_message.as_deref().unwrap_or(""));
    let reason = reason.as_ref();
    let (action, level, http_status, code) = match processed {
        Processed::Rejected(_) => ("rejected", tracing::Level::WARN, -1, ""),
        Processed::Attempted(a) => {
            let level = match a.action {
                Action::Done(_) | Action::Retry { .. } => tracing::Level::INFO,
                Action::Fail | Action::PauseSeller(_) => tracing::Level::WARN,
                Action::PauseQueue(_) => tracing::Level::ERROR,
            };
            (
                a.action.name(),
                level,
                a.http_status.map(i64::from).unwrap_or(-1),
                a.code.as_deref().unwrap_or(""),
            )
        }
    };
    metrics::counter!("invoice_worker_attempts_total", "queue" => queue.as_str(), "action" => action).increment(1);
    attempt_event!(
        level,
        queue,
        label,
        order,
        seller,
        row_id,
        attempt,
        action,
        status,
        http_status,
        code,
        reason,
        duration_ms,
        "attempt"
    );
    if let Processed::Attempted(Attempted {
        action: Action::PauseQueue(d),
        ..
    }) = processed
    {
        tracing::error!(queue = queue.as_str(), pause = %humantime::format_duration(*d), reason,
            "whole queue paused: fix the credentials or quota, then run `invoice-worker resume --queue {} '*'`", queue.as_str());
    }
}

/// Logs a failed maintenance step; one that met a busy database is simply done next round.
fn maintenance_failed(queue: QueueName, what: &str, error: &StoreError) {
    if error.is_busy() {
        tracing::debug!(queue = queue.as_str(), %error, "{what} postponed: the database is busy");
    } else {
        tracing::error!(queue = queue.as_str(), %error, "{what} failed");
    }
}

/// Renews this daemon's leases every third of the lease and returns rows of dead daemons.
async fn lease_keeper(
    store: Store,
    queue: QueueName,
    s: WorkerSettings,
    held: Held,
    stop: CancellationToken,
) {
    let every = (s.lease / 3).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let now = now_ms();
        // Only rows whose task is alive: a row whose task ended without a result is left to
        // its lease, and so to the rescue.
        let alive: Vec<(i64, String)> = lock(&held)
            .iter()
            .map(|(id, token)| (*id, token.clone()))
            .collect();
        if let Err(e) = store
            .renew_leases(queue, &alive, now + s.lease.as_millis() as i64)
            .await
        {
            maintenance_failed(queue, "lease renewal", &e);
        }
        match store.reject_unschedulable(queue, now).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                queue = queue.as_str(),
                rejected = n,
                "rows whose next_attempt_at is not an integer rejected (they could never fall due)"
            ),
            Err(e) => maintenance_failed(queue, "checking for unschedulable rows", &e),
        }
        match store
            .rescue_expired(queue, now, s.backoff.max_attempts)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                queue = queue.as_str(),
                rescued = n,
                "rows whose lease expired (their daemon died) are claimable again"
            ),
            Err(e) => maintenance_failed(queue, "lease rescue", &e),
        }
    }
}
