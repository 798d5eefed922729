//! The generic queue machinery both queues share: claim (producer), complete (completer),
//! backoff, classification into actions, pauses, rate limits and the worker loop. Knows
//! nothing about invoices: a queue plugs in through [`worker::Handler`].

pub mod action;
pub mod attempt;
pub mod backoff;
pub mod completer;
pub mod decide;
pub mod heartbeat;
pub mod housekeeping;
pub mod leases;
pub mod pauses;
pub mod rescue;
pub mod rules;
pub mod worker;

use crate::store::{QueueName, StoreError};

/// Logs a failed maintenance step; one that met a busy database is simply done next round.
fn maintenance_failed(queue: QueueName, what: &str, error: &StoreError) {
    if error.is_busy() {
        tracing::debug!(queue = queue.as_str(), %error, "{what} postponed: the database is busy");
    } else {
        tracing::error!(queue = queue.as_str(), %error, "{what} failed");
    }
}
