//! Section 3: claim cost against the number of finished rows. A queue that keeps its done
//! rows for weeks must not claim slower for it: the claim goes through the partial index of
//! pending rows, so claiming 64 pending rows should cost the same beside 1 000 or 1 000 000
//! finished ones (SPEC target: at most 1.5× the small table's cost).
//!
//! Both databases are prepared from a connection of the benchmark's own (done rows that
//! look like real ones, then the pending rows), and the planner's choice for the store's
//! steady-state claim statement is printed. The claims themselves go through
//! `Store::claim`, interleaved between the two databases so that load from elsewhere on the
//! machine hits both alike; after each claim the rows are put back from the benchmark's
//! connection (not timed).

use std::time::{Duration, Instant};

use invoice_worker::store::scratch::ScratchDatabase;
use invoice_worker::store::{now_ms, QueueName, Store};
use sqlx::{Connection, SqliteConnection};

use crate::support::{claim_rebill, insert_pending, writer, BenchResult, TAX};
use crate::{verdict, Knobs, Summary};

/// Rows pending during the claim-cost measurement (one claim takes them all).
const CLAIM_PENDING: u32 = 64;

/// Claims timed per database (after 20 untimed warm-up claims).
const ITERATIONS: u32 = 400;
const WARM_UP: u32 = 20;

/// A scratch database with finished and pending rows, and the benchmark's own connection
/// on it.
struct ClaimDb {
    scratch: ScratchDatabase,
    conn: SqliteConnection,
}

/// A database with `finished` done rows and [`CLAIM_PENDING`] pending ones.
async fn claim_db(finished: u64) -> BenchResult<ClaimDb> {
    let scratch = ScratchDatabase::new(Duration::from_secs(10)).await?;
    let mut conn = writer(&scratch.path()).await?;
    let t = Instant::now();
    let now = now_ms();
    insert_finished(&mut conn, finished, now).await?;
    insert_pending(&mut conn, "PENDING-", CLAIM_PENDING as u64).await?;
    scratch.store().checkpoint().await?;
    println!(
        "  [{finished} finished] database prepared in {:.2} s ({finished} done + {CLAIM_PENDING} pending rows)",
        t.elapsed().as_secs_f64()
    );
    print_claim_plan(scratch.store(), finished).await?;
    Ok(ClaimDb { scratch, conn })
}

/// Finished rows look like real ones: done, finished over the past days.
async fn insert_finished(conn: &mut SqliteConnection, finished: u64, now: i64) -> BenchResult<()> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "INSERT INTO rebill_orders (orderno, tax_num, status, outcome, attempts, next_attempt_at, last_code, \
           last_message, created_at, updated_at, finished_at, recent_attempts) \
         WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
         SELECT 'DONE-' || i, ?2, 'done', 'accepted', 1, ?3 - i * 100, '0', '重试成功', \
           ?3 - i * 100, ?3 - i * 100 + 50, ?3 - i * 100 + 50, '[' || (?3 - i * 100) || ']' FROM s",
    )
    .bind(finished as i64)
    .bind(TAX)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// What the planner does with the steady-state claim statement.
async fn print_claim_plan(store: &Store, finished: u64) -> BenchResult<()> {
    let plan = store.explain_claim(QueueName::Rebill).await?;
    println!("  [{finished} finished] claim plan: {}", plan.join(" | "));
    Ok(())
}

impl ClaimDb {
    /// One claim of every pending row, timed; then the rows are put back (not timed).
    async fn timed_claim(&mut self, i: u32) -> BenchResult<Duration> {
        let token = format!("bench-token-{i}");
        let t = Instant::now();
        let batch = claim_rebill(self.scratch.store(), &token, CLAIM_PENDING).await?;
        let took = t.elapsed();
        if batch.rows.len() != CLAIM_PENDING as usize {
            return Err(format!(
                "claim returned {} rows, expected {CLAIM_PENDING}",
                batch.rows.len()
            )
            .into());
        }
        // Reset attempts and recent_attempts too, so every claim does the same work.
        sqlx::query(
            "UPDATE rebill_orders SET status = 'pending', attempts = 0, claim_token = NULL, claimed_by = NULL, \
             lease_expires_at = NULL, recent_attempts = '[]', next_attempt_at = ?1 WHERE status = 'running'",
        )
        .bind(now_ms() - 1)
        .execute(&mut self.conn)
        .await?;
        Ok(took)
    }

    async fn close(self) -> BenchResult<()> {
        self.conn.close().await?;
        self.scratch.close().await;
        Ok(())
    }
}

struct ClaimStats {
    median: f64,
    p10: f64,
    mean: f64,
}

fn claim_stats(mut samples: Vec<Duration>) -> ClaimStats {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    ClaimStats {
        median: us(samples[samples.len() / 2]),
        p10: us(samples[samples.len() / 10]),
        mean: samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64,
    }
}

/// Claims from both databases in turn; the timings after the warm-up, per database.
async fn interleaved(
    small: &mut ClaimDb,
    large: &mut ClaimDb,
) -> BenchResult<(Vec<Duration>, Vec<Duration>)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..(ITERATIONS + WARM_UP) {
        let ta = small.timed_claim(i).await?;
        let tb = large.timed_claim(i).await?;
        if i >= WARM_UP {
            a.push(ta);
            b.push(tb);
        }
    }
    Ok((a, b))
}

/// Section 3.
pub async fn run(knobs: &Knobs, summary: &mut Summary) -> BenchResult<()> {
    println!();
    println!("== 3. claim cost vs finished rows ==");
    let (n_small, n_large) = (knobs.rows(1_000), knobs.rows(1_000_000));
    let mut small_db = claim_db(n_small).await?;
    let mut large_db = claim_db(n_large).await?;
    // Interleaved, so that load from elsewhere on the machine hits both alike.
    let (a, b) = interleaved(&mut small_db, &mut large_db).await?;
    let small_counts = count_costs(&small_db).await?;
    let large_counts = count_costs(&large_db).await?;
    let small_pages = page_costs(&mut small_db).await?;
    let large_pages = page_costs(&mut large_db).await?;
    small_db.close().await?;
    large_db.close().await?;
    let (a, b) = (claim_stats(a), claim_stats(b));
    for (n, st) in [(n_small, &a), (n_large, &b)] {
        println!(
            "  [{n} finished] claim of {CLAIM_PENDING} rows: median {:.1} µs, p10 {:.1} µs, mean {:.1} µs over {ITERATIONS} claims (interleaved; put-back not timed)",
            st.median, st.p10, st.mean
        );
    }
    let ratio = b.median / a.median;
    let ratio_p10 = b.p10 / a.p10;
    println!(
        "  median claim {n_large} vs {n_small} finished rows: {ratio:.2}× (p10: {ratio_p10:.2}×)"
    );
    summary.add(
        3,
        format!("claim µs (64 rows), {n_small} finished"),
        format!("{:.1}", a.median),
        "(median)",
    );
    summary.add(
        3,
        format!("claim µs (64 rows), {n_large} finished"),
        format!("{:.1}", b.median),
        "(median)",
    );
    summary.add(
        3,
        "claim cost ratio (median)",
        format!("{ratio:.2}×"),
        format!("<= 1.5× ({})", verdict(ratio <= 1.5)),
    );
    for (n, (active, finished)) in [(n_small, small_counts), (n_large, large_counts)] {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "  [{n} finished] the daemon's depth count: active rows {:.0} µs, finished rows {:.0} µs (median of {COUNT_RUNS}) → finished counted every {:.1} s",
            us(active),
            us(finished),
            (finished * 500).max(Duration::from_secs(2)).as_secs_f64()
        );
        summary.add(
            3,
            format!("depth count µs, active / finished rows, {n} finished"),
            format!("{:.0} / {:.0}", us(active), us(finished)),
            "(background, never per scrape)",
        );
    }
    for (n, pages) in [(n_small, &small_pages), (n_large, &large_pages)] {
        for (path, ms) in pages {
            println!("  [{n} finished] console GET {path}: median {ms:.2} ms over {PAGE_RUNS} requests (loopback HTTP)");
        }
    }
    if let Some((_, ms)) = large_pages.first() {
        summary.add(
            3,
            format!("console GET / ms, {n_large} finished rows"),
            format!("{ms:.2}"),
            format!("<= 50 ms ({})", verdict(*ms <= 50.0)),
        );
    }
    for (path, ms) in large_pages.iter().skip(1) {
        summary.add(
            3,
            format!("console GET {path} ms, {n_large} finished"),
            format!("{ms:.2}"),
            "(median)",
        );
    }
    Ok(())
}

/// Requests timed per console page.
const PAGE_RUNS: usize = 25;

/// The console served over loopback HTTP on `db` (its depths counted once, as the daemon's
/// counter would have): the median time of each page, ms. `/` first.
async fn page_costs(db: &mut ClaimDb) -> BenchResult<Vec<(String, f64)>> {
    use std::sync::Arc;
    let store = db.scratch.store().clone();
    let depths = invoice_worker::depths::Depths::new();
    depths
        .refresh(&store.clone().into(), now_ms(), true)
        .await?;
    let (last_id,): (i64,) = sqlx::query_as("SELECT MAX(id) FROM rebill_orders")
        .fetch_one(&mut db.conn)
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let console = Arc::new(invoice_worker::console::Console::new(
        store.clone().into(),
        depths,
        None,
        invoice_worker::clock::Clock::system(),
        listener.local_addr()?,
    ));
    let base = format!("http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, invoice_worker::console::routes(console))
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
    });
    let client = reqwest::Client::new();
    // The hundredth page of done rows: the cursor of a row deep in the table.
    let (deep_f, deep_id): (i64, i64) = sqlx::query_as(
        "SELECT finished_at, id FROM rebill_orders WHERE status = 'done' \
         ORDER BY finished_at DESC, id DESC LIMIT 1 OFFSET 5000",
    )
    .fetch_optional(&mut db.conn)
    .await?
    .unwrap_or((0, 0));
    let paths = [
        "/".to_string(),
        "/rows?queue=rebill&status=done".to_string(),
        format!("/rows?queue=rebill&status=done&after={deep_f}:{deep_id}"),
        "/rows?queue=rebill&status=failed".to_string(),
        format!("/rows/rebill/{last_id}"),
    ];
    let mut out = Vec::new();
    for path in paths {
        let mut times = Vec::with_capacity(PAGE_RUNS);
        for _ in 0..PAGE_RUNS {
            let t = Instant::now();
            let response = client.get(format!("{base}{path}")).send().await?;
            let status = response.status();
            response.bytes().await?;
            times.push(t.elapsed());
            if !status.is_success() {
                return Err(format!("GET {path}: {status}").into());
            }
        }
        times.sort();
        out.push((path, times[PAGE_RUNS / 2].as_secs_f64() * 1e3));
    }
    stop.cancel();
    let _ = server.await;
    Ok(out)
}

/// How often the depth counts are timed per database.
const COUNT_RUNS: usize = 9;

/// The median cost of the daemon's background depth count, (active, finished) parts.
async fn count_costs(db: &ClaimDb) -> BenchResult<(Duration, Duration)> {
    let depths = invoice_worker::depths::Depths::new();
    let (mut active, mut finished) = (Vec::new(), Vec::new());
    for _ in 0..COUNT_RUNS {
        let (a, f) = depths
            .refresh(&db.scratch.store().clone().into(), now_ms(), true)
            .await?;
        active.push(a);
        finished.push(f);
    }
    active.sort();
    finished.sort();
    Ok((active[COUNT_RUNS / 2], finished[COUNT_RUNS / 2]))
}
