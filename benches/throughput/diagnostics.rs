//! Section 6: the two halves of the end-to-end path measured alone, to show what the
//! end-to-end figure of section 1 is made of (section 1 also uses both loops as this
//! machine's limits).
//!
//! - The store loop: claim a batch with `Store::claim`, complete it with `Store::complete`
//!   (the method the daemon's completer calls), until the table is drained; no HTTP. It runs
//!   with claim/complete batches of 64/64, 64/1 and 8/8. `Store::complete` writes a batch in
//!   one guarded `UPDATE … FROM json_each` statement while no pause is recorded (as here),
//!   and row by row otherwise; which one it takes is the store's decision, not a public
//!   choice, so this section measures the store's one path and has no per-row or "what-if"
//!   comparison (it used to time a copy of the store's SQL).
//! - The HTTP loop: the signed rebill client against the zero-latency simulator, 64
//!   requests at once; no database.

use std::time::{Duration, Instant};

use invoice_worker::clients::rebill::{RebillClient, RebillSettings};
use invoice_worker::secret::Secret;
use invoice_worker::sim::{SimOptions, Simulator};
use invoice_worker::store::complete::{Completion, FinalStatus};
use invoice_worker::store::driver::QueueStore;
use invoice_worker::store::pauses::PauseChange;
use invoice_worker::store::rows::{Claimed, RebillRow};
use invoice_worker::store::scratch::ScratchDatabase;
use invoice_worker::store::{now_ms, QueueName};

use crate::support::{claim_rebill, insert_pending_into, BenchResult, CpuWindow, TAX};
use crate::{Knobs, Summary};

/// The result a successful attempt reports.
fn done_completion(c: &Claimed<RebillRow>, now: i64) -> Completion {
    Completion {
        id: c.meta.id,
        claim_token: c.meta.claim_token.clone(),
        status: FinalStatus::Done,
        outcome: Some("accepted"),
        next_attempt_at: now,
        refund_attempt: false,
        last_code: Some("0".into()),
        last_message: Some("重试成功".into()),
        invoice_no: None,
        invoice_down_url: None,
        recent_attempts: None,
        pause: PauseChange::Nothing,
        confirm_since: None,
        attempt: None,
        now,
    }
}

/// The figures of one store loop.
pub struct StoreLoop {
    /// Rows claimed and completed per second.
    pub rate: f64,
    /// Mean time of one claim, µs.
    pub claim_us: f64,
    /// Completion time per row, µs.
    pub complete_us_row: f64,
    /// This process's CPU per row, µs.
    pub cpu_us_row: f64,
}

/// Time spent in claims and completions, and how many of each.
#[derive(Default)]
pub struct LoopTimes {
    /// Time in claims.
    pub claim: Duration,
    /// Time in completions.
    pub complete: Duration,
    /// Claims made (the last one empty).
    pub claims: u64,
    /// Completion transactions.
    pub completes: u64,
    /// Rows completed.
    pub rows: u64,
}

/// Claim `claim` rows, complete them in transactions of `complete_batch`, until drained.
pub async fn store_loop(n: u64, claim: u32, complete_batch: usize) -> BenchResult<StoreLoop> {
    let scratch = ScratchDatabase::new(Duration::from_secs(10)).await?;
    let store = scratch.store().clone();
    insert_pending_into(&scratch.path(), "STORE-", n).await?;
    let cpu = CpuWindow::start();
    let t0 = Instant::now();
    let times = claim_and_complete(&store, claim, complete_batch).await?;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    scratch.close().await;
    if times.rows != n {
        return Err(format!("store loop completed {} of {n} rows", times.rows).into());
    }
    let figures = StoreLoop {
        rate: n as f64 / elapsed,
        claim_us: times.claim.as_secs_f64() * 1e6 / times.claims as f64,
        complete_us_row: times.complete.as_secs_f64() * 1e6 / n as f64,
        cpu_us_row: cpu.own_us_per(n),
    };
    println!(
        "  store only, claim {claim} / complete {complete_batch} per transaction (Store::complete): {:.0} rows/s; {:.0} µs per claim, {:.0} µs per completion transaction ({:.1} µs per row); {:.0} µs CPU/row; {}",
        figures.rate,
        figures.claim_us,
        times.complete.as_secs_f64() * 1e6 / times.completes as f64,
        figures.complete_us_row,
        figures.cpu_us_row,
        cpu.describe()
    );
    Ok(figures)
}

/// The loop itself: claims until a claim comes back empty, completing every claimed row
/// (on either backend).
pub async fn claim_and_complete<S: QueueStore>(
    store: &S,
    claim: u32,
    complete_batch: usize,
) -> BenchResult<LoopTimes> {
    let mut times = LoopTimes::default();
    loop {
        let token = format!("tok-{}", times.claims);
        let t = Instant::now();
        let batch = claim_rebill(store, &token, claim).await?;
        times.claim += t.elapsed();
        times.claims += 1;
        if batch.rows.is_empty() {
            return Ok(times);
        }
        let now = now_ms();
        let items: Vec<Completion> = batch.rows.iter().map(|c| done_completion(c, now)).collect();
        for chunk in items.chunks(complete_batch) {
            let t = Instant::now();
            let applied = QueueStore::complete(store, QueueName::Rebill, chunk).await?;
            times.rows += applied.iter().filter(|a| **a).count() as u64;
            times.complete += t.elapsed();
            times.completes += 1;
        }
    }
}

/// The rebill client alone against the zero-latency simulator, `concurrency` requests at once.
pub async fn http_loop(n: u64, concurrency: u64) -> BenchResult<(f64, f64)> {
    let opts = SimOptions::default();
    let sim = Simulator::start(opts.clone()).await?;
    let client = RebillClient::new(RebillSettings {
        endpoint: url::Url::parse(&sim.rebill_url())?,
        appid: opts.rebill_appid.clone(),
        app_secret: Secret::new(opts.rebill_secret.clone()),
        timeout: Duration::from_secs(5),
    })?;
    let cpu = CpuWindow::start();
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let client = client.clone();
        tasks.spawn(async move {
            let mut ok = 0u64;
            let mut i = t;
            while i < n {
                let answer = client.send(TAX, &format!("HTTP-{i}")).await;
                // Codes 0 and 100 are the answers a row is done with.
                if matches!(answer, Ok(a) if matches!(a.code_num, 0 | 100)) {
                    ok += 1;
                }
                i += concurrency;
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        ok += r?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    sim.shutdown();
    let rate = n as f64 / elapsed;
    println!(
        "  HTTP only (rebill client → simulator, {concurrency} at once): {rate:.0} requests/s, {ok} of {n} accepted; {:.0} µs CPU/request (client + simulator); {}",
        cpu.own_us_per(n),
        cpu.describe()
    );
    Ok((rate, cpu.own_us_per(n)))
}

/// Section 6.
pub async fn run(knobs: &Knobs, summary: &mut Summary) -> BenchResult<()> {
    println!();
    println!("== 6. diagnostics: the parts of the end-to-end path measured alone ==");
    println!(
        "  completions through Store::complete, the daemon's completer's path (one guarded UPDATE … FROM json_each per transaction while no pause is recorded); the store offers no other completion path, so no per-row comparison"
    );
    let n = knobs.rows(20_000);
    let l64 = store_loop(n, 64, 64).await?;
    let l64_1 = store_loop(n, 64, 1).await?;
    let l8 = store_loop(n, 8, 8).await?;
    let (http_rate, http_cpu) = http_loop(n, 64).await?;
    summary.add(
        6,
        "store only: claim 64 + complete 64/tx, rows/s",
        format!("{:.0}", l64.rate),
        format!(
            "({:.0} µs/claim, {:.1} µs/row to complete, {:.0} µs CPU/row)",
            l64.claim_us, l64.complete_us_row, l64.cpu_us_row
        ),
    );
    summary.add(
        6,
        "store only: claim 64 + complete 1/tx, rows/s",
        format!("{:.0}", l64_1.rate),
        format!("({:.0} µs/row to complete)", l64_1.complete_us_row),
    );
    summary.add(
        6,
        "store only: claim 8 + complete 8/tx, rows/s",
        format!("{:.0}", l8.rate),
        format!("({:.0} µs/claim)", l8.claim_us),
    );
    summary.add(
        6,
        "HTTP only, 64 at once, requests/s",
        format!("{http_rate:.0}"),
        format!("({http_cpu:.0} µs CPU/request)"),
    );
    Ok(())
}
