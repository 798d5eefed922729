//! Section 2: a latency-bound drain. Against a simulator answering after 200 ms with
//! `max_in_flight` 8, no daemon can beat 8 / 0.2 s = 40 rows/s; the figure is how close the
//! daemon gets to that bound (SPEC target: 90 %), i.e. whether it keeps every permitted
//! request slot busy instead of waiting on its own claims and completions.

use std::time::Duration;

use invoice_worker::sim::SimOptions;

use crate::e2e::{drain, E2E_CLAIM_BATCH, E2E_RATE};
use crate::support::BenchResult;
use crate::{verdict, Knobs, Summary};

/// Settings of the latency-bound run.
const LAT_LATENCY: Duration = Duration::from_millis(200);
const LAT_MAX_IN_FLIGHT: u32 = 8;

/// Section 2.
pub async fn run(knobs: &Knobs, summary: &mut Summary) -> BenchResult<()> {
    println!();
    println!("== 2. latency-bound run: simulator latency {LAT_LATENCY:?}, max_in_flight {LAT_MAX_IN_FLIGHT} ==");
    let bound = LAT_MAX_IN_FLIGHT as f64 / LAT_LATENCY.as_secs_f64();
    let n = knobs.rows((bound * 10.0) as u64);
    let opts = SimOptions {
        latency: LAT_LATENCY,
        ..SimOptions::default()
    };
    let d = drain(
        n,
        opts,
        LAT_MAX_IN_FLIGHT,
        E2E_RATE,
        E2E_CLAIM_BATCH,
        true,
        "latency",
    )
    .await?;
    let pct = d.rate / bound * 100.0;
    println!(
        "  {} rows in {:.3} s = {:.2} rows/s vs bound {LAT_MAX_IN_FLIGHT} / {:.1} s = {bound:.0} rows/s → {pct:.1} % of the bound",
        d.rows,
        d.elapsed.as_secs_f64(),
        d.rate,
        LAT_LATENCY.as_secs_f64()
    );
    summary.add(
        2,
        "200 ms sim, 8 in flight: % of 40 rows/s",
        format!("{pct:.1} %"),
        format!(">= 90 % ({})", verdict(pct >= 90.0)),
    );
    Ok(())
}
