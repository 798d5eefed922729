//! Throughput benchmark (SPEC §8): prints its figures, never asserts timing.
//!
//! Sections (each on a fresh database file in a temporary directory, WAL mode):
//!
//! 1. end-to-end rebill drain against the zero-latency simulator, N = 10 000 and 100 000;
//! 2. latency-bound drain against a 200 ms simulator with `max_in_flight` 8;
//! 3. claim cost with 1 000 vs 1 000 000 finished rows in the table;
//! 4. idle daemon CPU and RSS (in-process, and the real binary as a child process);
//! 5. insert-to-attempt latency while the daemon idles;
//! 6. diagnostics: the store's claim/complete loop and the HTTP client measured alone, to
//!    show what the end-to-end figure is made of;
//! 7. the PostgreSQL store on a throwaway cluster: its claim/complete loop (the storage
//!    limit) with 1, 2 and 4 claimers on one table, and its claim cost vs finished rows.
//!
//! Sections 4 and 5 run first, while the process is still small (its RSS is part of the
//! figure); the results are printed in section order at the end.
//!
//! Environment knobs for quick iteration (defaults give the full run):
//! `BENCH_SECTIONS=1,3` runs only some sections; `BENCH_SCALE=0.1` scales row counts and
//! durations down; `BENCH_POLL_MS=100` overrides `worker.poll_interval` in sections 4 and 5;
//! `BENCH_LOG=1` installs the daemon's log subscriber (stderr, INFO), as the binary does.
//!
//! Layout: one module per section (`e2e`, `latency`, `claim_cost`, `idle`, `pickup`,
//! `diagnostics`, `postgres`), the helpers they share in `support`. The benchmark reaches the database
//! only through the store's public API and through connections of its own opened on the
//! database file, as another process inserting or watching rows would.

mod claim_cost;
mod diagnostics;
mod e2e;
mod idle;
mod latency;
mod pickup;
mod postgres;
mod support;

use std::str::FromStr;
use std::time::Duration;

use support::BenchResult;

/// The environment knobs (see the module doc).
struct Knobs {
    sections: Vec<u32>,
    scale: f64,
    /// Overrides `worker.poll_interval` in sections 4 and 5 (default: the config default).
    poll: Option<Duration>,
}

impl Knobs {
    fn from_env() -> Knobs {
        let sections = std::env::var("BENCH_SECTIONS")
            .ok()
            .map(|s| {
                s.split(',')
                    .filter_map(|x| u32::from_str(x.trim()).ok())
                    .collect::<Vec<_>>()
            })
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| vec![1, 2, 3, 4, 5, 6, 7]);
        let scale = std::env::var("BENCH_SCALE")
            .ok()
            .and_then(|s| f64::from_str(&s).ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(1.0);
        let poll = std::env::var("BENCH_POLL_MS")
            .ok()
            .and_then(|s| u64::from_str(&s).ok())
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        Knobs {
            sections,
            scale,
            poll,
        }
    }

    fn on(&self, section: u32) -> bool {
        self.sections.contains(&section)
    }

    fn rows(&self, n: u64) -> u64 {
        ((n as f64 * self.scale).round() as u64).max(1)
    }

    fn time(&self, d: Duration) -> Duration {
        d.mul_f64(self.scale).max(Duration::from_millis(500))
    }
}

/// The order the sections run in: idle and pickup first, so their memory figures are not
/// inflated by the big drains.
const SECTIONS: [(u32, &str); 7] = [
    (4, "4. idle daemon"),
    (5, "5. insert-to-attempt latency"),
    (1, "1. end-to-end throughput"),
    (2, "2. latency-bound run"),
    (3, "3. claim cost vs finished rows"),
    (6, "6. diagnostics"),
    (7, "7. PostgreSQL store"),
];

fn main() {
    let knobs = Knobs::from_env();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build the tokio runtime: {e}");
            return;
        }
    };
    print_header(&knobs);
    let mut summary = Summary::default();
    runtime.block_on(run_sections(&knobs, &mut summary));
    summary.print();
}

/// The machine and the knobs in effect; installs the log subscriber when `BENCH_LOG` is set.
fn print_header(knobs: &Knobs) {
    println!("invoice-worker throughput benchmark");
    println!(
        "  machine: {} CPUs online; tokio multi-thread runtime with default workers; release build; SQLite WAL, synchronous=NORMAL",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    if knobs.scale != 1.0 {
        println!(
            "  BENCH_SCALE = {} (row counts and durations scaled; not the reference run)",
            knobs.scale
        );
    }
    if std::env::var_os("BENCH_LOG").is_some() {
        // What the real binary does: one INFO line per attempt to stderr.
        invoice_worker::telemetry::init(&invoice_worker::config::LogConfig::default());
        println!(
            "  BENCH_LOG set: the daemon's log lines go to stderr (redirect it), as in production"
        );
    }
}

async fn run_sections(knobs: &Knobs, summary: &mut Summary) {
    for (number, title) in SECTIONS {
        if !knobs.on(number) {
            continue;
        }
        let result = match number {
            4 => idle::run(knobs, summary).await,
            5 => pickup::run(knobs, summary).await,
            1 => e2e::run(knobs, summary).await,
            2 => latency::run(knobs, summary).await,
            3 => claim_cost::run(knobs, summary).await,
            7 => postgres::run(knobs, summary).await,
            _ => diagnostics::run(knobs, summary).await,
        };
        report(title, result);
    }
}

fn report(what: &str, result: BenchResult<()>) {
    if let Err(e) = result {
        println!("  !! {what}: failed: {e}");
    }
}

/// The figures of every section, printed as one table at the end.
#[derive(Default)]
struct Summary {
    rows: Vec<(u32, String, String, String)>,
}

impl Summary {
    fn add(
        &mut self,
        section: u32,
        what: impl Into<String>,
        measured: impl Into<String>,
        target: impl Into<String>,
    ) {
        self.rows
            .push((section, what.into(), measured.into(), target.into()));
    }

    fn print(&mut self) {
        self.rows.sort_by_key(|r| r.0);
        println!();
        println!("== summary ==");
        let w1 = self
            .rows
            .iter()
            .map(|r| r.1.chars().count())
            .max()
            .unwrap_or(0)
            .max(6);
        let w2 = self
            .rows
            .iter()
            .map(|r| r.2.chars().count())
            .max()
            .unwrap_or(0)
            .max(8);
        println!("{:<3} {:<w1$}  {:>w2$}  target", "§", "figure", "measured");
        for (section, what, measured, target) in &self.rows {
            println!("{section:<3} {what:<w1$}  {measured:>w2$}  {target}");
        }
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}
