//! Section 5: insert-to-attempt latency. While the real binary idles, another connection
//! (as another process would) inserts single rows at random 100–200 ms intervals; the
//! figure is the time from each insert's commit to the simulator receiving the request for
//! that row. It shows whether the daemon notices a commit at once (the `-wal` watcher)
//! rather than at its next poll (SPEC targets: p50 at most 10 ms, max at most 100 ms).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use invoice_worker::config::Config;
use invoice_worker::sim::{SimOptions, Simulator};
use sqlx::{Connection, SqliteConnection};

use crate::support::{binary_path, describe_config, observer, start_binary, BenchResult, TAX};
use crate::{verdict, Knobs, Summary};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

/// Inserts `rows` single rows at random 100–200 ms intervals; when each commit returned.
async fn insert_slowly(
    writer: &mut SqliteConnection,
    rows: u64,
) -> BenchResult<HashMap<String, Instant>> {
    let mut committed: HashMap<String, Instant> = HashMap::new();
    for i in 0..rows {
        let gap = rand::random_range(100..=200u64);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let orderno = format!("PICKUP-{i}");
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES (?1, ?2)")
            .bind(&orderno)
            .bind(TAX)
            .execute(&mut *writer)
            .await?;
        committed.insert(orderno, Instant::now());
    }
    Ok(committed)
}

/// Commit-to-request latencies in ms, sorted, and how many rows never reached the simulator.
fn latencies(sim: &Simulator, mut committed: HashMap<String, Instant>) -> (Vec<f64>, usize) {
    let mut lat: Vec<f64> = Vec::new();
    for r in sim.rebill_requests() {
        if let Some(at) = committed.remove(&r.orderno) {
            lat.push(r.received_at.saturating_duration_since(at).as_secs_f64() * 1e3);
        }
    }
    lat.sort_by(f64::total_cmp);
    (lat, committed.len())
}

/// Section 5.
pub async fn run(knobs: &Knobs, summary: &mut Summary) -> BenchResult<()> {
    println!();
    println!(
        "== 5. insert-to-attempt latency (the real binary, idle, single inserts from another connection) =="
    );
    let rows = knobs.rows(200);
    let dir = tempfile::tempdir()?;
    let opts = SimOptions::default();
    let sim = Simulator::start(opts.clone()).await?;
    let Some(bin) = binary_path() else {
        println!("  real binary not found (run `cargo build --release`); skipping");
        summary.add(5, "insert-to-attempt latency", "skipped", "binary missing");
        return Ok(());
    };
    let mut config = Config::default();
    config.database.path = dir.path().join("queue.db");
    config.housekeeping.enabled = false;
    config.rebill.endpoint = sim.rebill_url();
    config.title.base_url = Some(sim.title_base_url());
    if let Some(poll) = knobs.poll {
        config.worker.poll_interval = poll;
    }
    println!(
        "  settings: the production defaults ({}), log at info to a file; {rows} rows at random 100–200 ms intervals",
        describe_config(&config)
    );
    let (child, _log) = start_binary(&bin, dir.path(), &config, &opts).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut writer = observer(&config.database.path).await?;
    let committed = insert_slowly(&mut writer, rows).await?;
    // Let the last ones through.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.rebill_requests().len() < rows as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(child);
    writer.close().await?;

    let (lat, missing) = latencies(&sim, committed);
    report(summary, &lat, missing);
    sim.shutdown();
    Ok(())
}

fn report(summary: &mut Summary, lat: &[f64], missing: usize) {
    let (p50, p90, max) = (
        percentile(lat, 0.5),
        percentile(lat, 0.9),
        lat.last().copied().unwrap_or(f64::NAN),
    );
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    println!(
        "  {} rows: insert commit → simulator received: p50 {p50:.1} ms, p90 {p90:.1} ms, max {max:.1} ms, mean {mean:.1} ms; {missing} never arrived",
        lat.len()
    );
    summary.add(
        5,
        "insert-to-attempt p50 (real binary)",
        format!("{p50:.1} ms"),
        format!("<= 10 ms ({})", verdict(p50 <= 10.0)),
    );
    summary.add(
        5,
        "insert-to-attempt p90 / max (real binary)",
        format!("{p90:.1} / {max:.1} ms"),
        format!("max <= 100 ms ({})", verdict(max <= 100.0 && missing == 0)),
    );
}
