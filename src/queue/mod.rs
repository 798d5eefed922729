//! The generic queue machinery both queues share, in River's shape: a producer loop
//! ([`worker`]) claims as many rows as it has free slots and runs an [`attempt`] for each;
//! the [`completer`] writes results in batches; lease renewal ([`leases`]) and the
//! [`rescue`]r are services of their own; [`pauses`] is the pause state machine; backoff,
//! actions and operator rules decide what an answer means for the row. Knows no queue's
//! row fields, wire format or built-in rules (it carries the outcome and an issued
//! invoice's number and URL through to the store): a queue plugs in through
//! [`attempt::Handler`].

pub mod action;
pub mod attempt;
pub mod backoff;
pub mod completer;
pub mod decide;
pub mod heartbeat;
pub mod housekeeping;
pub mod leases;
pub mod pause_gate;
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
