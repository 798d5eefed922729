//! Section 4: what an idle daemon costs. With both queues enabled and empty and the
//! production worker defaults, the daemon should sleep on the commit watcher rather than
//! poll busily: the figures are its CPU share of a core (from schedstat, and from the stat
//! ticks as a cross-check), its resident memory and its thread count over a quiet window.
//!
//! Measured twice: in-process (which also counts the simulator and the benchmark's runtime,
//! so it is an upper bound), and the real binary started as a child process on a config
//! file, the honest figure (SPEC targets: at most 0.1 % of a core and 25 MB). This section
//! runs first, while the benchmark process is still small.

use std::time::Duration;

use invoice_worker::config::Config;
use invoice_worker::secret::Secret;
use invoice_worker::sim::{SimOptions, Simulator};
use invoice_worker::store::scratch::ScratchDatabase;

use crate::support::{
    binary_path, clock_ticks, cpu_sample, describe_config, start_binary, start_daemon, BenchResult,
    CpuSample,
};
use crate::{verdict, Knobs, Summary};

/// (VmRSS, VmHWM) in KiB.
fn memory(pid: &str) -> BenchResult<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

struct IdleFigures {
    pct_ticks: f64,
    pct_sched: f64,
    rss_kib: u64,
    hwm_kib: u64,
    threads: usize,
}

/// Prints one idle measurement: `what` was measured, `note` follows the figures.
fn print_idle(what: &str, f: &IdleFigures, note: &str) {
    println!(
        "  {what}: CPU {:.3} % of a core (schedstat), {:.2} % (stat ticks); VmRSS {:.1} MiB (peak {:.1} MiB), {} threads{note}",
        f.pct_sched,
        f.pct_ticks,
        f.rss_kib as f64 / 1024.0,
        f.hwm_kib as f64 / 1024.0,
        f.threads
    );
}

fn idle_figures(pid: &str, a: CpuSample, b: CpuSample) -> BenchResult<IdleFigures> {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    let pct_ticks = (b.ticks - a.ticks) as f64 / clock_ticks() / wall * 100.0;
    let pct_sched = (b.sched_ns.saturating_sub(a.sched_ns)) as f64 / 1e9 / wall * 100.0;
    let (rss_kib, hwm_kib) = memory(pid)?;
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))?.count();
    Ok(IdleFigures {
        pct_ticks,
        pct_sched,
        rss_kib,
        hwm_kib,
        threads,
    })
}

/// After a second to settle, samples `pid` at both ends of `window`.
async fn idle_window(pid: &str, window: Duration) -> BenchResult<IdleFigures> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = cpu_sample(pid)?;
    tokio::time::sleep(window).await;
    let b = cpu_sample(pid)?;
    idle_figures(pid, a, b)
}

/// Production defaults for the worker (poll 250 ms, lease 30 s, 8 in flight, 20/s), both
/// queues pointed at the simulator, housekeeping off.
fn idle_config(
    knobs: &Knobs,
    sim: &Simulator,
    opts: &SimOptions,
    db: std::path::PathBuf,
) -> BenchResult<Config> {
    let mut config = Config::default();
    config.database.path = db;
    config.housekeeping.enabled = false;
    config.rebill.endpoint = sim.rebill_url();
    config.rebill.appid = Some(opts.rebill_appid.clone());
    config.rebill.app_secret = Some(Secret::new(opts.rebill_secret.clone()));
    config.title.base_url = Some(sim.title_base_url());
    config.title.client_id = Some(opts.title_client_id.clone());
    config.title.client_secret = Some(Secret::new(opts.title_client_secret.clone()));
    config.title.sqm = Some("TEST-SQM".into());
    if let Some(poll) = knobs.poll {
        config.worker.poll_interval = poll;
    }
    config.validate()?;
    Ok(config)
}

/// Section 4.
pub async fn run(knobs: &Knobs, summary: &mut Summary) -> BenchResult<()> {
    println!();
    println!("== 4. idle daemon (empty queues, both enabled, default worker settings) ==");
    let window = knobs.time(Duration::from_secs(10));
    let dir = tempfile::tempdir()?;
    let opts = SimOptions::default();
    let sim = Simulator::start(opts.clone()).await?;
    let mut config = idle_config(knobs, &sim, &opts, dir.path().join("queue.db"))?;
    println!(
        "  settings: {} (housekeeping off)",
        describe_config(&config)
    );
    in_process(&mut config, window, summary).await?;
    // The real binary as a child: the honest figure.
    let Some(bin) = binary_path() else {
        println!("  real binary not found (run `cargo build --release`); skipping the child-process measurement");
        summary.add(
            4,
            "idle CPU / RSS, real binary",
            "skipped",
            "binary missing",
        );
        return Ok(());
    };
    let mut child_config = config.clone();
    child_config.database.path = dir.path().join("child.db");
    let (child, _log) = start_binary(&bin, dir.path(), &child_config, &opts).await?;
    let f = idle_window(&child.0.id().to_string(), window).await?;
    drop(child);
    let what = format!(
        "real binary {} (config file with production defaults, housekeeping on; {:.1} s window)",
        bin.display(),
        window.as_secs_f64()
    );
    print_idle(&what, &f, "");
    add_binary_figures(summary, &f);
    sim.shutdown();
    Ok(())
}

/// The daemon in this process, on a scratch database (`config`'s database path is set
/// to it): this process also holds the simulator and the benchmark's runtime.
async fn in_process(
    config: &mut Config,
    window: Duration,
    summary: &mut Summary,
) -> BenchResult<()> {
    let scratch = ScratchDatabase::new(config.database.busy_timeout).await?;
    config.database.path = scratch.path();
    let store = scratch.store().clone();
    let daemon = start_daemon(config, &store);
    let f = idle_window("self", window).await?;
    daemon.stop().await?;
    scratch.close().await;
    let what = format!("in-process ({:.1} s window)", window.as_secs_f64());
    print_idle(&what, &f, " — includes the simulator and benchmark runtime");
    summary.add(
        4,
        "idle CPU, in-process (% of a core)",
        format!("{:.3} %", f.pct_sched),
        format!("<= 0.5 % ({})", verdict(f.pct_sched <= 0.5)),
    );
    summary.add(
        4,
        "idle VmRSS, in-process (incl. simulator)",
        format!("{:.1} MiB", f.rss_kib as f64 / 1024.0),
        "(informative)",
    );
    Ok(())
}

fn add_binary_figures(summary: &mut Summary, f: &IdleFigures) {
    summary.add(
        4,
        "idle CPU, real binary (% of a core)",
        format!("{:.3} %", f.pct_sched),
        format!("<= 0.1 % ({})", verdict(f.pct_sched <= 0.1)),
    );
    let rss_mb = f.rss_kib as f64 / 1024.0;
    summary.add(
        4,
        "idle VmRSS, real binary",
        format!("{rss_mb:.1} MiB"),
        format!("<= 25 MB ({})", verdict(f.rss_kib as f64 * 1024.0 <= 25e6)),
    );
}
