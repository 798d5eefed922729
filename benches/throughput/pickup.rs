//! Section 5: insert-to-attempt latency. While the real binary idles, another connection
//! (as another process would) inserts single rows at random 100–200 ms intervals; the
//! figure is the time from each insert's commit to the simulator receiving the request for
//! that row. It shows whether the daemon notices a commit at once (the `-wal` watcher)
//! rather than at its next poll (SPEC targets: p50 at most 10 ms, max at most 100 ms).
//! Section 7 measures the same on PostgreSQL (LISTEN/NOTIFY) with [`on_postgres`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use invoice_worker::config::Config;
use invoice_worker::sim::{SimOptions, Simulator};
use invoice_worker::store::postgres::cluster::ScratchCluster;
use sqlx::{Connection, PgConnection, SqliteConnection};

use crate::support::{binary_path, describe_config, observer, start_binary, BenchResult, TAX};
use crate::{verdict, Knobs, Summary};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

/// Another process's connection, inserting the rows.
enum Writer {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Writer {
    /// Inserts one due row, as another system would.
    async fn insert(&mut self, orderno: &str) -> BenchResult<()> {
        const SQL: &str = "INSERT INTO rebill_orders (orderno, tax_num) VALUES ($1, $2)";
        match self {
            Writer::Sqlite(c) => {
                sqlx::query(SQL).bind(orderno).bind(TAX).execute(c).await?;
            }
            Writer::Postgres(c) => {
                sqlx::query(SQL).bind(orderno).bind(TAX).execute(c).await?;
            }
        }
        Ok(())
    }

    async fn close(self) -> BenchResult<()> {
        match self {
            Writer::Sqlite(c) => c.close().await?,
            Writer::Postgres(c) => c.close().await?,
        }
        Ok(())
    }
}

/// Inserts `rows` single rows at random 100–200 ms intervals; when each commit returned.
async fn insert_slowly(writer: &mut Writer, rows: u64) -> BenchResult<HashMap<String, Instant>> {
    let mut committed: HashMap<String, Instant> = HashMap::new();
    for i in 0..rows {
        let gap = rand::random_range(100..=200u64);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let orderno = format!("PICKUP-{i}");
        writer.insert(&orderno).await?;
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
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.database.path = dir.path().join("queue.db");
    let open_writer = || async {
        BenchResult::Ok(Writer::Sqlite(
            observer(&dir.path().join("queue.db")).await?,
        ))
    };
    let Some((lat, missing)) = measure(knobs, dir.path(), config, open_writer).await? else {
        summary.add(5, "insert-to-attempt latency", "skipped", "binary missing");
        return Ok(());
    };
    let labels = [
        "insert-to-attempt p50 (real binary)",
        "insert-to-attempt p90 / max (real binary)",
    ];
    report(summary, 5, labels, &lat, missing);
    Ok(())
}

/// The same on a fresh database of `cluster`: the real binary on PostgreSQL, woken by
/// LISTEN/NOTIFY; reported in section 7.
pub async fn on_postgres(
    cluster: &ScratchCluster,
    knobs: &Knobs,
    summary: &mut Summary,
) -> BenchResult<()> {
    let dir = tempfile::tempdir()?;
    let url = cluster.create_database().await?;
    let mut config = Config::default();
    config.database.url = Some(url.clone());
    let open_writer =
        || async { BenchResult::Ok(Writer::Postgres(PgConnection::connect(&url).await?)) };
    println!("  insert-to-attempt latency, the real binary on PostgreSQL (LISTEN/NOTIFY):");
    let Some((lat, missing)) = measure(knobs, dir.path(), config, open_writer).await? else {
        summary.add(
            7,
            "PostgreSQL insert-to-attempt latency",
            "skipped",
            "binary missing",
        );
        return Ok(());
    };
    let labels = [
        "PostgreSQL insert-to-attempt p50 (real binary)",
        "PostgreSQL insert-to-attempt p90 / max (real binary)",
    ];
    report(summary, 7, labels, &lat, missing);
    Ok(())
}

/// Starts the real binary on `config`'s database (the production defaults otherwise) in
/// `dir`, inserts single rows slowly through `open_writer`'s connection once it runs, and
/// returns the commit-to-request latencies and how many never arrived; `None` without a
/// release binary.
async fn measure<F, Fut>(
    knobs: &Knobs,
    dir: &std::path::Path,
    mut config: Config,
    open_writer: F,
) -> BenchResult<Option<(Vec<f64>, usize)>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = BenchResult<Writer>>,
{
    let rows = knobs.rows(200);
    let opts = SimOptions::default();
    let sim = Simulator::start(opts.clone()).await?;
    let Some(bin) = binary_path() else {
        println!("  real binary not found (run `cargo build --release`); skipping");
        return Ok(None);
    };
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
    let (child, _log) = start_binary(&bin, dir, &config, &opts).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut writer = open_writer().await?;
    let committed = insert_slowly(&mut writer, rows).await?;
    // Let the last ones through.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.rebill_requests().len() < rows as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(child);
    writer.close().await?;

    let measured = latencies(&sim, committed);
    sim.shutdown();
    Ok(Some(measured))
}

fn report(summary: &mut Summary, section: u32, labels: [&str; 2], lat: &[f64], missing: usize) {
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
        section,
        labels[0],
        format!("{p50:.1} ms"),
        format!("<= 10 ms ({})", verdict(p50 <= 10.0)),
    );
    summary.add(
        section,
        labels[1],
        format!("{p90:.1} / {max:.1} ms"),
        format!("max <= 100 ms ({})", verdict(max <= 100.0 && missing == 0)),
    );
}
