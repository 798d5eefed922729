//! One attempt of one claimed row: wait for the rate limit, confirm the lease if the row
//! waited, prepare and process it through the queue's handler, plan its completion and hand
//! it to the completer. The [`AttemptRecord`] it produces feeds the log line (with the
//! handler's own fields) and the metrics.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use governor::DefaultDirectRateLimiter;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::action::{Action, Attempted};
use super::backoff::Backoff;
use super::completer::Finished;
use super::decide::{plan, Processed};
use super::leases::{self, HeldRows};
use super::pause_gate::PauseGate;
use crate::clock::Clock;
use crate::store::complete::Completion;
use crate::store::history::AttemptFacts;
use crate::store::pauses::PauseChange;
use crate::store::rows::{ClaimMeta, Claimed, QueueRow};
use crate::store::{Database, QueueName};
use crate::validate::invisible::escape_for_log;

/// What a queue plugs into the generic loop: how to handle one claimed row, and which of
/// its fields identify it in the attempt's log line.
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

    /// Emits the attempt's log line with the row's identifying fields, through
    /// [`crate::log_attempt`].
    fn log_attempt(&self, row: &Self::Row, record: &AttemptRecord);
}

/// The status an attempt record carries when its result is not written (the lease was
/// lost during the call).
pub const LOST: &str = "lease_lost";

/// Everything one attempt is remembered by: the log line, the metrics and the attempt
/// history are all made from it.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The queue.
    pub queue: QueueName,
    /// The row's id.
    pub row_id: i64,
    /// Which attempt this was (counted at claim).
    pub attempt: i64,
    /// `rejected`, or the action's name (`done`, `retry`, `pause_seller`, …).
    pub action: &'static str,
    /// The status the row is left in, or [`LOST`] when the result is not written because
    /// the lease was lost during the call.
    pub status: &'static str,
    /// The HTTP status, -1 when no answer arrived.
    pub http_status: i64,
    /// The remote code, empty when none.
    pub code: String,
    /// The reason stored as `last_message`, escaped for a log line.
    pub reason: String,
    /// How long handling the row took.
    pub duration: Duration,
    /// How serious the outcome is for an operator.
    pub level: tracing::Level,
    /// Set when the answer paused the whole queue, for how long.
    pub paused_queue_for: Option<Duration>,
}

impl AttemptRecord {
    /// The record of `processed`, which `completion` will write.
    pub fn new(
        queue: QueueName,
        meta: &ClaimMeta,
        processed: &Processed,
        completion: &Completion,
        duration: Duration,
    ) -> Self {
        let (action, level, http_status, code, paused_queue_for) = match processed {
            Processed::Rejected(_) => ("rejected", tracing::Level::WARN, -1, "", None),
            Processed::Attempted(a) => {
                let level = match a.action {
                    Action::Done(_) | Action::Retry { .. } | Action::AwaitConfirmation { .. } => {
                        tracing::Level::INFO
                    }
                    Action::Fail | Action::PauseSeller(_) => tracing::Level::WARN,
                    Action::PauseQueue(_) => tracing::Level::ERROR,
                };
                let paused = match a.action {
                    Action::PauseQueue(d) => Some(d),
                    _ => None,
                };
                (
                    a.action.name(),
                    level,
                    a.http_status.map(i64::from).unwrap_or(-1),
                    a.code.as_deref().unwrap_or(""),
                    paused,
                )
            }
        };
        AttemptRecord {
            queue,
            row_id: meta.id,
            attempt: meta.attempts,
            action,
            status: completion.status.as_str(),
            http_status,
            code: code.to_string(),
            // Server messages may hold characters that reorder or hide the rest of the
            // line (U+202E): shown escaped.
            reason: escape_for_log(completion.last_message.as_deref().unwrap_or("")).into_owned(),
            duration,
            level,
            paused_queue_for,
        }
    }

    /// What the history keeps of this attempt, which `instance` started at `started_at`
    /// (epoch ms).
    pub fn facts(&self, instance: &Arc<str>, started_at: i64) -> AttemptFacts {
        AttemptFacts {
            attempt: self.attempt,
            instance: instance.clone(),
            started_at,
            duration_ms: self.duration_ms() as i64,
            http_status: self.http_status,
            action: self.action,
            message: self.reason.clone(),
        }
    }

    /// The duration in whole milliseconds, as logged.
    pub fn duration_ms(&self) -> u64 {
        self.duration.as_millis() as u64
    }

    /// Counts the attempt in the metrics.
    pub fn count(&self) {
        let queue = self.queue.as_str();
        metrics::counter!("invoice_worker_attempts_total", "queue" => queue, "action" => self.action)
            .increment(1);
        // Every attempt that was sent (or tried to be), answered or not.
        if self.action != "rejected" {
            metrics::histogram!("invoice_worker_request_duration_seconds", "queue" => queue)
                .record(self.duration.as_secs_f64());
        }
    }

    /// The operator's line for an answer that paused the whole queue.
    fn log_queue_pause(&self) {
        if let Some(d) = self.paused_queue_for {
            let queue = self.queue.as_str();
            tracing::error!(queue, pause = %humantime::format_duration(d), reason = self.reason.as_str(),
                "whole queue paused: fix the credentials or quota, then run `invoice-worker resume --queue {queue} '*'`");
        }
    }
}

/// Emits one attempt line for an [`AttemptRecord`] at the level it carries, with the
/// queue's own identifying fields given as tracing fields
/// (`log_attempt!(record, orderno = %o, tax_num = %t)`): tracing needs field names at
/// compile time, so each handler names its own.
#[macro_export]
macro_rules! log_attempt {
    ($record:expr, $($field:tt)+) => {{
        let r: &$crate::queue::attempt::AttemptRecord = $record;
        match r.level {
            tracing::Level::ERROR => tracing::error!(queue = r.queue.as_str(), $($field)+, row_id = r.row_id, attempt = r.attempt, action = r.action, status = r.status, http_status = r.http_status, code = r.code.as_str(), reason = r.reason.as_str(), duration_ms = r.duration_ms(), "attempt"),
            tracing::Level::WARN => tracing::warn!(queue = r.queue.as_str(), $($field)+, row_id = r.row_id, attempt = r.attempt, action = r.action, status = r.status, http_status = r.http_status, code = r.code.as_str(), reason = r.reason.as_str(), duration_ms = r.duration_ms(), "attempt"),
            _ => tracing::info!(queue = r.queue.as_str(), $($field)+, row_id = r.row_id, attempt = r.attempt, action = r.action, status = r.status, http_status = r.http_status, code = r.code.as_str(), reason = r.reason.as_str(), duration_ms = r.duration_ms(), "attempt"),
        }
    }};
}

/// What every attempt of one worker shares.
pub(super) struct AttemptContext<H: Handler> {
    pub handler: Arc<H>,
    pub store: Database,
    pub backoff: Backoff,
    pub lease: Duration,
    pub clock: Clock,
    /// When the row was claimed: a row that waited long for its turn checks its lease first.
    pub claimed_at: Instant,
    pub limiter: Arc<DefaultDirectRateLimiter>,
    /// A 429/503 with Retry-After holds the whole queue until then (ms).
    pub hold_until: Arc<AtomicI64>,
    pub held: HeldRows,
    pub tx: mpsc::Sender<Finished>,
    /// Closed while a pause-starting result is on its way to the database.
    pub pause_gate: PauseGate,
    pub queue: QueueName,
    pub shutdown: CancellationToken,
    /// This daemon instance, as its claims record it (for the history).
    pub instance: Arc<str>,
}

/// Waits for the rate limiter and any Retry-After hold; false when shutdown came first.
async fn wait_for_turn<H: Handler>(ctx: &AttemptContext<H>) -> bool {
    tokio::select! {
        _ = ctx.limiter.until_ready() => {}
        _ = ctx.shutdown.cancelled() => return false,
    }
    loop {
        let hold = ctx.hold_until.load(Ordering::Relaxed) - ctx.clock.now_ms();
        if hold <= 0 {
            return !ctx.shutdown.is_cancelled();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(hold as u64)) => {}
            _ = ctx.shutdown.cancelled() => return false,
        }
    }
}

/// Runs one attempt of `claimed`, holding `permit` (a slot of `max_in_flight`) throughout.
pub(super) async fn run<H: Handler>(
    ctx: AttemptContext<H>,
    mut claimed: Claimed<H::Row>,
    permit: OwnedSemaphorePermit,
) {
    let _permit = permit;
    // A row still waiting for its turn when shutdown comes is not sent: it stays held and
    // goes back to pending with its attempt refunded.
    if !wait_for_turn(&ctx).await {
        return;
    }
    // From here on the row is let go when the attempt ends, or panics.
    let hold = ctx.held.until_done(claimed.meta.id);
    // A row that waited for its turn (the rate limit, a frozen or starved process) may have
    // lost its lease meanwhile, and another daemon may be sending it now: check, and renew,
    // before sending. A lost or unverifiable lease means the row is not sent; the lease
    // brings it back to whoever holds it now.
    let waited = ctx.claimed_at.elapsed();
    if waited > ctx.lease / 3
        && !leases::renew_before_sending(
            &ctx.store,
            ctx.queue,
            &claimed.meta,
            ctx.lease,
            &ctx.clock,
            waited,
        )
        .await
    {
        hold.done();
        return;
    }
    let started = Instant::now();
    let started_at = ctx.clock.now_ms();
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
    let now = ctx.clock.now_ms();
    let seller = claimed.row.seller();
    let mut completion = plan(
        &claimed.meta,
        &seller,
        &processed,
        &ctx.backoff,
        now,
        rand::random::<f64>(),
    );
    let mut record = AttemptRecord::new(
        ctx.queue,
        &claimed.meta,
        &processed,
        &completion,
        started.elapsed(),
    );
    // The lease keeper found the lease gone during the call (and counted it): the row
    // belongs to another claim, which will write its own result.
    let lost = ctx.held.is_lost(claimed.meta.id);
    if lost {
        record.status = LOST;
    }
    completion.attempt = Some(record.facts(&ctx.instance, started_at));
    ctx.handler.log_attempt(&claimed.row, &record);
    record.log_queue_pause();
    record.count();

    if let Processed::Attempted(a) = &processed {
        if let (Action::Retry { after: Some(after) }, Some(429 | 503)) = (&a.action, a.http_status)
        {
            ctx.hold_until
                .fetch_max(now + after.as_millis() as i64, Ordering::Relaxed);
        }
    }
    let id = claimed.meta.id;
    if lost {
        tracing::warn!(
            queue = ctx.queue.as_str(),
            row_id = id,
            "result not written: the lease was lost during the call"
        );
        hold.done();
        return;
    }
    // Closed before the slot is freed, so that the worker's next claim waits for the pause.
    let pause = matches!(completion.pause, PauseChange::Start(_)).then(|| ctx.pause_gate.close());
    let finished = Finished {
        completion,
        row: Some(hold.until_written()),
        pause,
    };
    if ctx.tx.send(finished).await.is_err() {
        tracing::error!(
            queue = ctx.queue.as_str(),
            row_id = id,
            "completer stopped; result left to the lease"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::{Quota, RateLimiter};

    use super::*;
    use crate::config::RetryConfig;
    use crate::store::rows::RebillRow;
    use crate::store::test_support::{claim_rebill, insert_due, temp_store};

    /// A handler the turn-taking never reaches.
    struct Unused;

    impl Handler for Unused {
        type Row = RebillRow;
        async fn process(&self, _: &Claimed<RebillRow>) -> Processed {
            Processed::Attempted(Attempted::transient(None, "not called"))
        }
        fn log_attempt(&self, _: &RebillRow, _: &AttemptRecord) {}
    }

    /// A handler whose every answer is an SMS-login demand: pause the seller.
    struct PausesTheSeller;

    impl Handler for PausesTheSeller {
        type Row = RebillRow;
        async fn process(&self, _: &Claimed<RebillRow>) -> Processed {
            let mut answer = Attempted::transient(Some(200), "log in by SMS first");
            answer.action = Action::PauseSeller(Duration::from_secs(60));
            Processed::Attempted(answer)
        }
        fn log_attempt(&self, _: &RebillRow, _: &AttemptRecord) {}
    }

    fn context<H: Handler>(
        handler: H,
        store: Database,
        clock: Clock,
        hold_until: i64,
    ) -> (AttemptContext<H>, mpsc::Receiver<Finished>) {
        let (tx, rx) = mpsc::channel(1);
        let ctx = AttemptContext {
            handler: Arc::new(handler),
            store,
            backoff: Backoff::from(&RetryConfig::default()),
            lease: Duration::from_secs(30),
            clock,
            claimed_at: Instant::now(),
            limiter: Arc::new(RateLimiter::direct(Quota::per_second(NonZeroU32::MIN))),
            hold_until: Arc::new(AtomicI64::new(hold_until)),
            held: HeldRows::default(),
            tx,
            pause_gate: PauseGate::default(),
            queue: QueueName::Rebill,
            shutdown: CancellationToken::new(),
            instance: "test".into(),
        };
        (ctx, rx)
    }

    /// The worker's next claim must not run before a pause this attempt's answer starts is
    /// written: the gate is closed before the slot is freed, and the row stays held (its
    /// lease renewed) until the completer is done with the result.
    #[tokio::test]
    async fn a_pausing_result_closes_the_gate_and_keeps_the_row_until_written() {
        let (_db, store) = temp_store().await;
        insert_due(&store, &["SMS"]).await;
        let now = crate::store::now_ms();
        let mut batch = claim_rebill(&store, now, 1, Duration::from_secs(30), "tok").await;
        let claimed = batch.rows.pop().expect("claimed");
        let id = claimed.meta.id;
        let (ctx, mut rx) = context(PausesTheSeller, store.into(), Clock::system(), 0);
        let (gate, held) = (ctx.pause_gate.clone(), ctx.held.clone());
        held.hold(id, "tok");
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let permit = slots.clone().acquire_owned().await.expect("permit");
        run(ctx, claimed, permit).await;

        assert_eq!(slots.available_permits(), 1, "the slot is free");
        assert!(
            !gate.is_open(),
            "but claims wait for the pause to be written"
        );
        assert_eq!(held.alive(), vec![(id, "tok".to_string())]);
        let finished = rx.recv().await.expect("the result reached the completer");
        assert!(matches!(
            finished.completion.pause,
            PauseChange::Start(ref p) if p.scope == "T"
        ));
        drop(finished);
        assert!(gate.is_open(), "written: claims go on");
        assert!(held.alive().is_empty(), "written: the row is let go");
    }

    /// A Retry-After of an hour holds the next send for exactly that hour of the clock the
    /// worker was given: tokio's paused time moves it on, nothing sleeps for real.
    #[tokio::test]
    async fn a_retry_after_hold_is_waited_out_on_the_clock_passed_in() {
        let (_db, store) = temp_store().await;
        tokio::time::pause();
        let clock = Clock::following_tokio();
        let (ctx, _rx) = context(
            Unused,
            store.into(),
            clock.clone(),
            clock.after(Duration::from_secs(3600)),
        );
        let (virtual_start, real_start) = (tokio::time::Instant::now(), std::time::Instant::now());
        assert!(wait_for_turn(&ctx).await);
        let waited = virtual_start.elapsed();
        assert!(
            waited >= Duration::from_secs(3600) && waited < Duration::from_secs(3601),
            "{waited:?}"
        );
        assert!(real_start.elapsed() < Duration::from_secs(5));

        // Shutdown during a hold: the row is not sent.
        ctx.hold_until
            .store(clock.after(Duration::from_secs(600)), Ordering::Relaxed);
        let stop = ctx.shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            stop.cancel();
        });
        assert!(!wait_for_turn(&ctx).await);
    }
}
