//! The integration tests, one binary: the daemon in-process and as the real binary, against
//! a real SQLite file and the project's simulated servers over loopback HTTP.
//!
//! One module per concern; `common` holds the shared helpers (a simulator on port 0, a
//! scratch database, configs, the binary started as a child process).

// First: its macros are used by the modules after it.
#[macro_use]
mod common;
mod alerts;
mod cli;
mod confirm;
mod console;
mod history;
mod ops;
mod process;
mod rebill;
mod title;
