//! Alerts: telling a person about what only a person can fix (a seller that must log in,
//! refused credentials, rows that failed for good, a queue that stopped moving).
//!
//! State changes write an [`Event`] into the store's outbox in the same transaction that
//! makes the change (`store::outbox`); the deliverer posts each one to every target that
//! wants it, with retries, surviving restarts. [`text()`] writes what a person reads and
//! [`Poster`] posts it in each robot's own format.

pub mod deliver;
pub mod event;
pub mod monitor;
pub mod send;
pub mod text;

pub use deliver::Deliverer;
pub use event::{Event, EventKind, FailedRow, MAX_EXAMPLES};
pub use send::{PostError, Poster};
pub use text::text;
