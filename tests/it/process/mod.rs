//! Process-level tests: the real `invoice-worker` binary against the in-process simulator.
//! Signals (SIGTERM, SIGKILL), restarts, two daemons on one file, other processes inserting
//! while it drains, the command line's exit codes, and secrets in the logs.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{
    config_toml, database_line, scrubbed_binary, wait_until, Arg, Backend, Daemon, World, TAX,
};
use invoice_worker::sim::{RebillBehavior, SimOptions, TitleBehavior};
use nix::sys::signal::Signal;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The standard test config (crate::common::config_toml) with textual replacements (each `from`
/// must occur) and extra TOML appended, written to `name` in the world's directory.
fn write_toml(world: &World, name: &str, edits: &[(&str, &str)], extra: &str) -> PathBuf {
    let mut text = config_toml(&world.config, &SimOptions::default());
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "config template lacks {from:?}:\n{text}"
        );
        text = text.replace(from, to);
    }
    text.push_str(extra);
    let path = world.dir().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// A world on `backend` whose simulator takes `latency` to answer (`None`: no
/// PostgreSQL here, said loudly once).
async fn world_on(backend: Backend, latency: Duration) -> Option<World> {
    World::on_with_options(
        backend,
        SimOptions {
            latency,
            ..Default::default()
        },
    )
    .await
}

/// Starts the daemon on `config`, logging to `log` in the world's directory.
fn start_daemon(world: &World, config: &Path, log: &str) -> Daemon {
    Daemon::start(config, world.dir().join(log))
}

/// Two daemons on the same config (logs `{prefix}-a.log` and `{prefix}-b.log`), both up.
async fn start_pair(world: &World, config: &Path, prefix: &str) -> (Daemon, Daemon) {
    let a = start_daemon(world, config, &format!("{prefix}-a.log"));
    let b = start_daemon(world, config, &format!("{prefix}-b.log"));
    a.wait_running().await;
    b.wait_running().await;
    (a, b)
}

/// Writes `text` to `name` in `dir`; the path as a string, for `--config`.
fn write_cfg(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_string_lossy().into_owned()
}

/// A config of only `[database] path = db`, written to `name` in `dir`; its path.
fn db_only_cfg(dir: &Path, name: &str, db: &Path) -> String {
    write_cfg(
        dir,
        name,
        &format!("[database]\npath = \"{}\"\n", db.display()),
    )
}

/// Runs the binary with `args` in `cwd`, environment scrubbed, and returns its output.
fn cli(cwd: &Path, args: &[&str]) -> Output {
    cli_env(cwd, args, &[])
}

/// Like `cli`, with extra environment variables.
fn cli_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    scrubbed_binary()
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .output()
        .expect("run invoice-worker")
}

/// Runs `cli` and asserts exit code `code`; stdout.
fn cli_code(cwd: &Path, args: &[&str], code: i32, what: &str) -> String {
    let out = cli(cwd, args);
    expect_code(&out, code, what);
    text(&out.stdout)
}

/// Runs `cli` and asserts exit code `code`; stderr.
fn cli_err(cwd: &Path, args: &[&str], code: i32, what: &str) -> String {
    let out = cli(cwd, args);
    expect_code(&out, code, what);
    text(&out.stderr)
}

/// Runs `cli`, asserts success and that stdout contains every one of `needles`; stdout.
fn cli_ok(cwd: &Path, args: &[&str], what: &str, needles: &[&str]) -> String {
    let so = cli_code(cwd, args, 0, what);
    for needle in needles {
        assert!(
            so.contains(needle),
            "{what}: stdout lacks {needle:?}:\n{so}"
        );
    }
    so
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts an exit code, showing both streams when it differs.
fn expect_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Asserts the log contains every one of `lines`.
fn assert_log_has(log: &str, lines: &[&str]) {
    for line in lines {
        assert!(log.contains(line), "log lacks {line:?}:\n{log}");
    }
}

/// Inserts rebill rows, a few hundred per statement (a bulk writer).
async fn insert_many(world: &World, ordernos: &[String], tax_num: &str) {
    world.writer.insert_rebills(ordernos, tax_num).await;
}

/// Scripts every one of `ordernos` to be answered after `delay`.
fn script_delay<'a>(
    world: &World,
    ordernos: impl IntoIterator<Item = &'a String>,
    delay: Duration,
) {
    for o in ordernos {
        world
            .sim
            .script_rebill(o, vec![RebillBehavior::Delay(delay)]);
    }
}

/// (orderno, status, attempts) of every rebill row.
async fn rebill_rows(world: &World) -> Vec<(String, String, i64)> {
    world
        .writer
        .rows(
            "SELECT orderno, status, attempts FROM rebill_orders ORDER BY id",
            &[],
        )
        .await
}

/// How many rebill rows have `status`.
async fn rebill_count(world: &World, status: &str) -> i64 {
    world
        .count(&format!(
            "SELECT COUNT(*) FROM rebill_orders WHERE status = '{status}'"
        ))
        .await
}

/// Waits (up to `limit`) until exactly `n` rebill rows have `status`.
async fn wait_rows(world: &World, status: &str, n: usize, limit: Duration, what: &str) {
    wait_until(limit, what, || async move {
        rebill_count(world, status).await == n as i64
    })
    .await;
}

/// Waits (up to `secs` seconds) until exactly `n` rebill rows are done.
async fn wait_done(world: &World, n: usize, secs: u64, what: &str) {
    wait_rows(world, "done", n, Duration::from_secs(secs), what).await;
}

/// Waits until every one of `ordernos` reached the simulator (verified) and is running.
async fn wait_in_flight(world: &World, ordernos: &[String]) {
    wait_until(
        Duration::from_secs(15),
        "all delayed requests reached the simulator",
        || {
            let seen = world.verified_ordernos();
            let done = ordernos.iter().all(|o| seen.contains(o));
            async move { done }
        },
    )
    .await;
    wait_rows(
        world,
        "running",
        ordernos.len(),
        Duration::from_secs(5),
        "rows running",
    )
    .await;
}

/// Orderno → number of requests the simulator verified (signature ok, all checks passed).
fn verified_counts(world: &World) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in world.sim.rebill_requests() {
        if r.verified {
            *counts.entry(r.orderno).or_insert(0) += 1;
        }
    }
    counts
}

/// Ordernos the simulator verified and answered with one of `answers`.
fn answered_with(world: &World, answers: &[&str]) -> HashSet<String> {
    world
        .sim
        .rebill_requests()
        .into_iter()
        .filter(|r| r.verified && answers.contains(&r.answered))
        .map(|r| r.orderno)
        .collect()
}

/// Asserts there are `n` rebill rows, each done and `reached` the simulator (`how`).
async fn assert_all_done(world: &World, n: usize, reached: impl Fn(&str) -> bool, how: &str) {
    let rows = rebill_rows(world).await;
    assert_eq!(rows.len(), n, "rows lost or duplicated");
    for (orderno, status, _) in &rows {
        assert_eq!(status, "done", "{orderno}");
        assert!(reached(orderno), "{orderno} is done but {how}");
    }
}

/// Asserts there are `n` rebill rows, each done, and each answered by the simulator with
/// one of `answers` (so none is marked done without the gateway's acceptance).
async fn assert_all_accepted(world: &World, n: usize, answers: &[&str]) {
    let accepted = answered_with(world, answers);
    assert_all_done(
        world,
        n,
        |o| accepted.contains(o),
        "the simulator never accepted it",
    )
    .await;
}

/// Asserts there are `n` rebill rows, each done after one attempt and verified by the
/// simulator exactly once, never in flight from two daemons at once.
async fn assert_each_sent_once(world: &World, n: usize) {
    assert_eq!(
        world.sim.overlapping_sends(),
        0,
        "the same order was in flight from both daemons at once"
    );
    let rows = rebill_rows(world).await;
    assert_eq!(rows.len(), n);
    let verified = verified_counts(world);
    for (orderno, status, attempts) in &rows {
        assert_eq!(status, "done", "{orderno}");
        assert_eq!(
            *attempts, 1,
            "{orderno} was claimed more than once (lease lost or taken over)"
        );
        assert_eq!(
            verified.get(orderno).copied(),
            Some(1),
            "{orderno} reached the simulator {:?} times",
            verified.get(orderno)
        );
    }
}

/// Lines of a log that mention SQLite lock contention.
fn busy_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("database is locked")
                || l.contains("sqlite_busy")
                || l.contains("database is busy")
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// Positions where `key` is directly followed by 32 lowercase hex characters.
fn key_then_hex32(log: &str, key: &str) -> Vec<String> {
    let bytes = log.as_bytes();
    let mut hits = Vec::new();
    for (pos, _) in log.match_indices(key) {
        let start = pos + key.len();
        if bytes.len() >= start + 32 && bytes[start..start + 32].iter().all(|b| is_lower_hex(*b)) {
            let end = (start + 40).min(log.len());
            hits.push(String::from_utf8_lossy(&bytes[pos..end]).into_owned());
        }
    }
    hits
}

mod command_line;
mod frozen;
mod kill;
mod logs;
mod postgres;
mod shutdown;
mod two_daemons;
mod writers;
