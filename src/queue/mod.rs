//! The generic queue machinery both queues share: claim (producer), complete (completer),
//! backoff, classification into actions, pauses, rate limits and the worker loop. Knows
//! nothing about invoices: a queue plugs in through [`worker::Handler`].

pub mod action;
pub mod backoff;
pub mod completer;
pub mod decide;
pub mod heartbeat;
pub mod housekeeping;
pub mod rules;
pub mod worker;
