//! The generic queue machinery both queues share.

pub mod action;
pub mod rules;
