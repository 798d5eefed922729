//! invoice-worker: a daemon that makes failed Chinese e-invoice work succeed eventually.
//!
//! Other systems insert rows into two SQLite tables; the daemon drains them against the
//! fw199 `rebillingnew` gateway and 开票精灵's FPTT1001 title interface, retrying with
//! backoff, and records each outcome in the same row.
//!
//! # Layout
//!
//! - [`cli`] — argument parsing and dispatch to commands; exit codes.
//! - [`config`] — loads and validates `worker.toml`; secrets via [`secret::Secret`].
//! - [`clock`] — the time the queue machinery judges leases, due times and backoff by.
//! - [`telemetry`] — the tracing subscriber, installed once by the binary.
//! - [`store`] — the pool, pragmas, migrations and every SQL statement.
//! - [`queue`] — the machinery both queues share: claim, complete, backoff,
//!   classification into actions, pauses, rate limits, the worker loop, housekeeping.
//! - [`clients`] — one struct per remote API: signing, encoding, parsing answers into
//!   typed results; no retry decisions, no database.
//! - [`jobs`] — the two queues' handlers: validate, prepare and send one row, and
//!   classify the client's answer into an action with the queue's rules.
//! - [`title_fields`] — the 13 FPTT1001 title fields, declared once for the store, the
//!   validator and the title client; masks the buyer's phone and account.
//! - [`validate`] — checks a row must pass before it is sent.
//! - [`daemon`] — wires config, store, clients and queues; systemd notifications.
//! - [`ops`] — the metrics and health HTTP endpoint.
//! - [`sim`] — simulated remote servers used by `sandbox`, the tests and the benchmark.
//! - [`report`] — the tables `status`, `list` and the sandbox print.
//! - [`sandbox`] — the self-contained demo run.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod clients;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod jobs;
pub mod ops;
pub mod queue;
pub mod report;
pub mod sandbox;
pub mod secret;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod title_fields;
pub mod validate;
