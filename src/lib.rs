//! invoice-worker: a daemon that makes failed Chinese e-invoice work succeed eventually.
//!
//! Other systems insert rows into two SQLite tables; the daemon drains them against the
//! fw199 `rebillingnew` gateway and 开票精灵's FPTT1001 title interface, retrying with
//! backoff, and records each outcome in the same row.
//!
//! # Layout
//!
//! Each module owns one thing. `daemon`, `cli` and `sandbox` at the edges wire the rest
//! together; `jobs` builds on `queue`, `clients` and `store`; `queue` on `store`; `clients`
//! on neither; `config`'s option types are read by all of them.
//!
//! - [`cli`] — argument parsing and dispatch to commands; exit codes.
//! - [`config`] — loads and validates `worker.toml` (`schema`, `validate`, `secrets`);
//!   produces options, builds no pools or clients. Secrets via [`secret::Secret`].
//! - [`telemetry`] — the tracing subscriber, installed once by the binary.
//! - [`daemon`] — wires config, store, clients and queues; systemd notifications.
//! - [`ops`] — the metrics and health HTTP endpoint.
//! - [`jobs`] — the two queues' handlers (`rebill/`, `title/`): validate, prepare and send
//!   one row, classify the client's typed answer into an action with the queue's rules
//!   (`classify.rs`), and name the row's fields in the attempt's log line.
//! - [`queue`] — the machinery both queues share, knowing no queue's fields, wire format or
//!   rules (it only carries the outcome and an issued invoice's number and URL through): the
//!   producer loop (`worker`), one attempt (`attempt`), the completer, lease renewal
//!   (`leases`), the rescuer (`rescue`), the pause state machine (`pauses`), backoff,
//!   actions and operator rules, heartbeats, housekeeping.
//! - [`clients`] — one struct per remote API: signing, encoding, parsing answers into
//!   typed results; no retry decisions, no database (imports nothing from `queue` or
//!   `store`).
//! - [`store`] — the SQLite store: pool, pragmas, migrations, every SQL statement (built
//!   once per queue in `sql.rs`), race-safe pause primitives, and the store's own
//!   background services (commit watcher, WAL keeper). Decides nothing about retries.
//! - [`validate`] — checks a row must pass before it is sent.
//! - [`title_fields`] — the 13 FPTT1001 title fields, declared once for the store, the
//!   validator and the title client; masks the buyer's phone and account.
//! - [`clock`] — the time the queue machinery judges leases, due times and backoff by,
//!   passed in so that tests move it instead of sleeping.
//! - [`sim`] — simulated remote servers used by `sandbox`, the tests and the benchmark.
//! - [`report`] — the tables `status`, `list` and the sandbox print.
//! - [`sandbox`] — the self-contained demo run.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod alerts;
pub mod cli;
pub mod clients;
pub mod clock;
pub mod config;
pub mod console;
pub mod daemon;
pub mod depths;
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
