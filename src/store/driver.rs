//! The store interface both backends implement, in the spirit of River's `riverdriver`:
//! one method per queue operation, with a params struct where an operation takes more than
//! a queue. SQLite ([`Store`]) and PostgreSQL ([`PgStore`]) each run their own SQL behind
//! it; the conformance suite (`tests/it/conformance.rs`) runs every operation against
//! both, so that the queue machinery cannot tell them apart.
//!
//! Times in and out are the caller's clock. SQLite has one host, so that clock is the
//! database's; PostgreSQL moves them across to its own clock (see
//! [`super::postgres::ClockBoundary`]).

use std::future::Future;

use std::time::Duration;

use super::admin::{Enqueued, NewRebill, NewTitle, PauseInfo, QueueCounts, RowSummary};
use super::claim::{ClaimBatch, ClaimParams};
use super::complete::Completion;
use super::history::{HistoryEntry, MinuteCount};
use super::outbox::{AlertDelivery, AlertReport, ClaimedAlert};
use super::pauses::{ClaimPlan, PauseView};
use super::postgres::PgStore;
use super::rows::QueueRow;
use super::show::RowDetail;
use super::{QueueName, Store, StoreError};
use crate::alerts::Event;

/// Rows this daemon holds, by id and claim token.
#[derive(Debug, Clone, Copy)]
pub struct HeldParams<'a> {
    /// The queue they belong to.
    pub queue: QueueName,
    /// (row id, claim token) of each.
    pub held: &'a [(i64, String)],
    /// The caller's now, ms.
    pub now: i64,
}

/// Inputs of a lease renewal.
#[derive(Debug, Clone, Copy)]
pub struct RenewParams<'a> {
    /// The rows to renew.
    pub rows: HeldParams<'a>,
    /// The new end of their leases (caller's clock), ms.
    pub lease_until: i64,
}

/// Inputs of a rescue of expired leases.
#[derive(Debug, Clone, Copy)]
pub struct RescueParams {
    /// The queue to rescue.
    pub queue: QueueName,
    /// The caller's now, ms (PostgreSQL judges expiry by its own clock).
    pub now: i64,
    /// `[worker] max_attempts`, for rows without their own limit.
    pub default_max_attempts: u32,
}

/// Inputs of one pruning batch.
#[derive(Debug, Clone, Copy)]
pub struct PruneParams<'a> {
    /// The queue to prune.
    pub queue: QueueName,
    /// The finished statuses to delete.
    pub statuses: &'a [&'a str],
    /// Rows that finished before this time (caller's clock), ms.
    pub finished_before: i64,
    /// Most rows deleted by one call.
    pub batch: u32,
    /// The caller's now, ms.
    pub now: i64,
}

/// Inputs of an operator's pause.
#[derive(Debug, Clone, Copy)]
pub struct PauseParams<'a> {
    /// The queue.
    pub queue: QueueName,
    /// A seller key, or `*` for the whole queue.
    pub scope: &'a str,
    /// When it ends (caller's clock), ms.
    pub until: i64,
    /// Why, as the operator gave it.
    pub reason: &'a str,
    /// The caller's now, ms.
    pub now: i64,
}

/// The queue operations of a store backend.
pub trait QueueStore: Clone + Send + Sync + 'static {
    /// Inserts a rebilling job unless an active row for the same order exists.
    fn enqueue_rebill(
        &self,
        job: &NewRebill,
        now: i64,
    ) -> impl Future<Output = Result<Enqueued, StoreError>> + Send;

    /// Inserts a title submission.
    fn enqueue_title(&self, job: &NewTitle)
        -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Stores a generated serial on a claimed title row (false: claim lost, or set already).
    fn set_title_serial(
        &self,
        id: i64,
        claim_token: &str,
        serial: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Claims due rows under a lease, following the pause plan the queue's policy makes.
    fn claim<R: QueueRow>(
        &self,
        params: &ClaimParams<'_>,
        plan: impl FnOnce(&[PauseView]) -> ClaimPlan + Send,
    ) -> impl Future<Output = Result<ClaimBatch<R>, StoreError>> + Send;

    /// Applies a batch of completions, each guarded by its claim token; per item, whether
    /// it was applied.
    fn complete(
        &self,
        queue: QueueName,
        items: &[Completion],
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// Extends held rows' leases; per row, whether the claim still held.
    fn renew_leases(
        &self,
        params: RenewParams<'_>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// Ends the attempts whose lease expired; how many.
    fn rescue_expired(
        &self,
        params: RescueParams,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Puts held rows back without using up their attempt; how many.
    fn release(
        &self,
        params: HeldParams<'_>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// When the next pending row falls due after `now`, if any.
    fn next_due_after(
        &self,
        queue: QueueName,
        now: i64,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Deletes one batch of finished rows past their retention; how many.
    fn prune_batch(
        &self,
        params: PruneParams<'_>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Counts of `queue`'s rows per status, the oldest due row's age, rows awaiting
    /// confirmation.
    fn counts(
        &self,
        queue: QueueName,
        now: i64,
    ) -> impl Future<Output = Result<QueueCounts, StoreError>> + Send;

    /// Whether the rescuer has anything to do at `now`.
    fn rescue_needed(
        &self,
        queue: QueueName,
        now: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Finished rows pending again with a fresh budget; the ids changed.
    fn retry(
        &self,
        queue: QueueName,
        ids: &[i64],
    ) -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;

    /// Every failed row (of one seller, when given) pending again; how many.
    fn retry_failed(
        &self,
        queue: QueueName,
        seller: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Rows newest first, optionally of one status.
    fn list(
        &self,
        queue: QueueName,
        status: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RowSummary>, StoreError>> + Send;

    /// Pending rows cancelled; the ids changed.
    fn cancel(
        &self,
        queue: QueueName,
        ids: &[i64],
    ) -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;

    /// Pauses a seller or the whole queue.
    fn pause(&self, params: PauseParams<'_>)
        -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Lifts a pause at once; whether there was one.
    fn resume(
        &self,
        queue: QueueName,
        scope: &str,
        now: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every recorded pause, its times in the caller's clock.
    fn pauses(&self, now: i64) -> impl Future<Output = Result<Vec<PauseInfo>, StoreError>> + Send;
}

impl QueueStore for Store {
    async fn enqueue_rebill(&self, job: &NewRebill, _now: i64) -> Result<Enqueued, StoreError> {
        Store::enqueue_rebill(self, job).await
    }

    async fn enqueue_title(&self, job: &NewTitle) -> Result<i64, StoreError> {
        Store::enqueue_title(self, job).await
    }

    async fn set_title_serial(
        &self,
        id: i64,
        claim_token: &str,
        serial: &str,
    ) -> Result<bool, StoreError> {
        Store::set_title_serial(self, id, claim_token, serial).await
    }

    async fn claim<R: QueueRow>(
        &self,
        params: &ClaimParams<'_>,
        plan: impl FnOnce(&[PauseView]) -> ClaimPlan + Send,
    ) -> Result<ClaimBatch<R>, StoreError> {
        Store::claim(self, params, plan).await
    }

    async fn complete(
        &self,
        queue: QueueName,
        items: &[Completion],
    ) -> Result<Vec<bool>, StoreError> {
        Store::complete(self, queue, items).await
    }

    async fn renew_leases(&self, p: RenewParams<'_>) -> Result<Vec<bool>, StoreError> {
        Store::renew_leases(self, p.rows.queue, p.rows.held, p.lease_until).await
    }

    async fn rescue_expired(&self, p: RescueParams) -> Result<u64, StoreError> {
        Store::rescue_expired(self, p.queue, p.now, p.default_max_attempts).await
    }

    async fn release(&self, p: HeldParams<'_>) -> Result<u64, StoreError> {
        Store::release(self, p.queue, p.held, p.now).await
    }

    async fn next_due_after(&self, queue: QueueName, now: i64) -> Result<Option<i64>, StoreError> {
        Store::next_due_after(self, queue, now).await
    }

    async fn prune_batch(&self, p: PruneParams<'_>) -> Result<u64, StoreError> {
        Store::prune_batch(self, p.queue, p.statuses, p.finished_before, p.batch).await
    }
    async fn counts(&self, queue: QueueName, now: i64) -> Result<QueueCounts, StoreError> {
        Store::counts(self, queue, now).await
    }

    async fn rescue_needed(&self, queue: QueueName, now: i64) -> Result<bool, StoreError> {
        Store::rescue_needed(self, queue, now).await
    }

    async fn retry(&self, queue: QueueName, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        Store::retry(self, queue, ids).await
    }

    async fn cancel(&self, queue: QueueName, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        Store::cancel(self, queue, ids).await
    }

    async fn retry_failed(
        &self,
        queue: QueueName,
        seller: Option<&str>,
    ) -> Result<u64, StoreError> {
        match seller {
            Some(seller) => Store::retry_failed_of_seller(self, queue, seller).await,
            None => Store::retry_all_failed(self, queue).await,
        }
    }

    async fn list(
        &self,
        queue: QueueName,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RowSummary>, StoreError> {
        Store::list(self, queue, status, limit).await
    }

    async fn pause(&self, p: PauseParams<'_>) -> Result<(), StoreError> {
        Store::pause(self, p.queue, p.scope, p.until, p.reason).await
    }

    async fn resume(&self, queue: QueueName, scope: &str, _now: i64) -> Result<bool, StoreError> {
        Store::resume(self, queue, scope).await
    }

    async fn pauses(&self, _now: i64) -> Result<Vec<PauseInfo>, StoreError> {
        Store::pauses(self).await
    }
}

impl QueueStore for PgStore {
    async fn enqueue_rebill(&self, job: &NewRebill, now: i64) -> Result<Enqueued, StoreError> {
        PgStore::enqueue_rebill(self, job, now).await
    }

    async fn enqueue_title(&self, job: &NewTitle) -> Result<i64, StoreError> {
        PgStore::enqueue_title(self, job).await
    }

    async fn set_title_serial(
        &self,
        id: i64,
        claim_token: &str,
        serial: &str,
    ) -> Result<bool, StoreError> {
        PgStore::set_title_serial(self, id, claim_token, serial).await
    }

    async fn claim<R: QueueRow>(
        &self,
        params: &ClaimParams<'_>,
        plan: impl FnOnce(&[PauseView]) -> ClaimPlan + Send,
    ) -> Result<ClaimBatch<R>, StoreError> {
        PgStore::claim(self, params, plan).await
    }

    async fn complete(
        &self,
        queue: QueueName,
        items: &[Completion],
    ) -> Result<Vec<bool>, StoreError> {
        PgStore::complete(self, queue, items).await
    }

    async fn renew_leases(&self, p: RenewParams<'_>) -> Result<Vec<bool>, StoreError> {
        PgStore::renew_leases(self, p.rows.queue, p.rows.held, p.lease_until, p.rows.now).await
    }

    async fn rescue_expired(&self, p: RescueParams) -> Result<u64, StoreError> {
        PgStore::rescue_expired(self, p.queue, p.default_max_attempts).await
    }

    async fn release(&self, p: HeldParams<'_>) -> Result<u64, StoreError> {
        PgStore::release(self, p.queue, p.held).await
    }

    async fn next_due_after(&self, queue: QueueName, now: i64) -> Result<Option<i64>, StoreError> {
        PgStore::next_due_after(self, queue, now).await
    }

    async fn prune_batch(&self, p: PruneParams<'_>) -> Result<u64, StoreError> {
        PgStore::prune_batch(self, p.queue, p.statuses, p.finished_before, p.batch, p.now).await
    }
    async fn counts(&self, queue: QueueName, now: i64) -> Result<QueueCounts, StoreError> {
        PgStore::counts(self, queue, now).await
    }

    async fn rescue_needed(&self, queue: QueueName, _now: i64) -> Result<bool, StoreError> {
        PgStore::rescue_needed(self, queue).await
    }

    async fn retry(&self, queue: QueueName, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        PgStore::retry(self, queue, ids).await
    }

    async fn cancel(&self, queue: QueueName, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        PgStore::cancel(self, queue, ids).await
    }

    async fn retry_failed(
        &self,
        queue: QueueName,
        seller: Option<&str>,
    ) -> Result<u64, StoreError> {
        PgStore::retry_failed(self, queue, seller).await
    }

    async fn list(
        &self,
        queue: QueueName,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RowSummary>, StoreError> {
        PgStore::list(self, queue, status, limit).await
    }

    async fn pause(&self, p: PauseParams<'_>) -> Result<(), StoreError> {
        PgStore::pause(self, p.queue, p.scope, p.until, p.reason, p.now).await
    }

    async fn resume(&self, queue: QueueName, scope: &str, now: i64) -> Result<bool, StoreError> {
        PgStore::resume(self, queue, scope, now).await
    }

    async fn pauses(&self, now: i64) -> Result<Vec<PauseInfo>, StoreError> {
        PgStore::pauses(self, now).await
    }
}

/// The alert outbox and the monitors' memory of a store backend (`alerts/` uses it).
pub trait AlertStore: Clone + Send + Sync + 'static {
    /// Writes an event to the outbox in a transaction of its own.
    fn raise_alert(&self, event: &Event) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Claims up to `limit` due alerts for `lease` under `token`.
    fn claim_alerts(
        &self,
        now: i64,
        lease: Duration,
        token: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ClaimedAlert>, StoreError>> + Send;

    /// Records a delivery round; false when the claim was lost.
    fn finish_alert(
        &self,
        id: i64,
        token: &str,
        delivered_to: &[String],
        result: &AlertDelivery,
        now: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// When the next undelivered alert is due.
    fn next_alert_due(
        &self,
        now: i64,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Remembers how a post to a target went.
    fn record_target(
        &self,
        name: &str,
        error: Option<&str>,
        now: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The outbox and the targets' health.
    fn alert_report(
        &self,
        now: i64,
    ) -> impl Future<Output = Result<AlertReport, StoreError>> + Send;

    /// A "rows failed" digest, once across daemons, when one is due.
    fn digest_failed(
        &self,
        queue: QueueName,
        now: i64,
        every: Duration,
    ) -> impl Future<Output = Result<Option<Event>, StoreError>> + Send;

    /// "Queue stuck" / "queue recovered", once per change across daemons.
    fn watch_stuck(
        &self,
        queue: QueueName,
        now: i64,
        after: Duration,
    ) -> impl Future<Output = Result<Option<Event>, StoreError>> + Send;

    /// Deletes one batch of finished alerts; how many.
    fn prune_alerts(
        &self,
        before: i64,
        batch: u32,
        now: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

impl AlertStore for Store {
    async fn raise_alert(&self, event: &Event) -> Result<(), StoreError> {
        Store::raise_alert(self, event).await
    }

    async fn claim_alerts(
        &self,
        now: i64,
        lease: Duration,
        token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedAlert>, StoreError> {
        Store::claim_alerts(self, now, lease, token, limit).await
    }

    async fn finish_alert(
        &self,
        id: i64,
        token: &str,
        delivered_to: &[String],
        result: &AlertDelivery,
        now: i64,
    ) -> Result<bool, StoreError> {
        Store::finish_alert(self, id, token, delivered_to, result, now).await
    }

    async fn next_alert_due(&self, now: i64) -> Result<Option<i64>, StoreError> {
        let _ = now;
        Store::next_alert_due(self).await
    }

    async fn record_target(
        &self,
        name: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        Store::record_target(self, name, error, now).await
    }

    async fn alert_report(&self, now: i64) -> Result<AlertReport, StoreError> {
        let _ = now;
        Store::alert_report(self).await
    }

    async fn digest_failed(
        &self,
        queue: QueueName,
        now: i64,
        every: Duration,
    ) -> Result<Option<Event>, StoreError> {
        Store::digest_failed(self, queue, now, every).await
    }

    async fn watch_stuck(
        &self,
        queue: QueueName,
        now: i64,
        after: Duration,
    ) -> Result<Option<Event>, StoreError> {
        Store::watch_stuck(self, queue, now, after).await
    }

    async fn prune_alerts(&self, before: i64, batch: u32, now: i64) -> Result<u64, StoreError> {
        let _ = now;
        Store::prune_alerts(self, before, batch).await
    }
}

impl AlertStore for PgStore {
    async fn raise_alert(&self, event: &Event) -> Result<(), StoreError> {
        PgStore::raise_alert(self, event).await
    }

    async fn claim_alerts(
        &self,
        now: i64,
        lease: Duration,
        token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedAlert>, StoreError> {
        PgStore::claim_alerts(self, now, lease, token, limit).await
    }

    async fn finish_alert(
        &self,
        id: i64,
        token: &str,
        delivered_to: &[String],
        result: &AlertDelivery,
        now: i64,
    ) -> Result<bool, StoreError> {
        PgStore::finish_alert(self, id, token, delivered_to, result, now).await
    }

    async fn next_alert_due(&self, now: i64) -> Result<Option<i64>, StoreError> {
        PgStore::next_alert_due(self, now).await
    }

    async fn record_target(
        &self,
        name: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        PgStore::record_target(self, name, error, now).await
    }

    async fn alert_report(&self, now: i64) -> Result<AlertReport, StoreError> {
        PgStore::alert_report(self, now).await
    }

    async fn digest_failed(
        &self,
        queue: QueueName,
        now: i64,
        every: Duration,
    ) -> Result<Option<Event>, StoreError> {
        PgStore::digest_failed(self, queue, now, every).await
    }

    async fn watch_stuck(
        &self,
        queue: QueueName,
        now: i64,
        after: Duration,
    ) -> Result<Option<Event>, StoreError> {
        PgStore::watch_stuck(self, queue, now, after).await
    }

    async fn prune_alerts(&self, before: i64, batch: u32, now: i64) -> Result<u64, StoreError> {
        PgStore::prune_alerts(self, before, batch, now).await
    }
}

/// What operators read of rows and attempts, and the history's housekeeping.
pub trait InspectStore: Clone + Send + Sync + 'static {
    /// One row with every column and its history; `None` if there is none.
    fn show(
        &self,
        queue: QueueName,
        id: i64,
    ) -> impl Future<Output = Result<Option<RowDetail>, StoreError>> + Send;

    /// A row's recorded attempts, oldest first.
    fn attempt_history(
        &self,
        queue: QueueName,
        id: i64,
    ) -> impl Future<Output = Result<Vec<HistoryEntry>, StoreError>> + Send;

    /// A queue's attempts per minute since `since`.
    fn attempts_per_minute(
        &self,
        queue: QueueName,
        since: i64,
    ) -> impl Future<Output = Result<Vec<MinuteCount>, StoreError>> + Send;

    /// Deletes per-minute counts older than `before`; how many.
    fn prune_minutes(&self, before: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Deletes history whose row is gone; how many.
    fn prune_orphaned_history(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Refreshes the planner's statistics.
    fn optimize(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The two stores' inspect operations have the same signatures: one delegation each.
macro_rules! inspect_store_for {
    ($($store:ty),*) => {$(
        impl InspectStore for $store {
            async fn show(&self, queue: QueueName, id: i64) -> Result<Option<RowDetail>, StoreError> {
                <$store>::show(self, queue, id).await
            }

            async fn attempt_history(
                &self,
                queue: QueueName,
                id: i64,
            ) -> Result<Vec<HistoryEntry>, StoreError> {
                <$store>::attempt_history(self, queue, id).await
            }

            async fn attempts_per_minute(
                &self,
                queue: QueueName,
                since: i64,
            ) -> Result<Vec<MinuteCount>, StoreError> {
                <$store>::attempts_per_minute(self, queue, since).await
            }

            async fn prune_minutes(&self, before: i64) -> Result<u64, StoreError> {
                <$store>::prune_minutes(self, before).await
            }

            async fn prune_orphaned_history(&self) -> Result<u64, StoreError> {
                <$store>::prune_orphaned_history(self).await
            }

            async fn optimize(&self) -> Result<(), StoreError> {
                <$store>::optimize(self).await
            }
        }
    )*};
}

inspect_store_for!(Store, PgStore);
