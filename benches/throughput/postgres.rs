//! Section 7: the PostgreSQL store on a throwaway cluster (`fsync=off`, loopback), run in
//! the same process as the SQLite sections so that the figures compare on one machine.
//!
//! - The storage limit: the bare claim-64 / complete-64 loop (`FOR UPDATE SKIP LOCKED`
//!   claim, one `unnest` completion per batch), the same loop as section 6's on SQLite.
//! - Claimers at once: 1 (three rounds, interleaved with the one-daemon drain), 2 and 4 such loops, each with its own pool, draining one table
//!   (what several daemons' stores do; contention must not make it slower), checking that
//!   every row is completed exactly once.
//! - Claim cost with 1 000 vs 1 000 000 finished rows in the table.
//! - End to end: 1, 2 and 4 daemons (in this process, each with a pool of its own) draining
//!   one database through the zero-latency simulator, every row sent exactly once.
//!
//! Skipped, with one line saying so, where no PostgreSQL server binaries are installed.

use std::time::Instant;

use invoice_worker::sim::{SimOptions, Simulator};
use invoice_worker::store::database::Location;
use invoice_worker::store::driver::{HeldParams, QueueStore};
use invoice_worker::store::postgres::{cluster, PgConnect, PgStore};
use invoice_worker::store::{now_ms, Database, QueueName};
use sqlx::{Connection, PgConnection};

use crate::diagnostics::claim_and_complete;
use crate::e2e::{E2E_CLAIM_BATCH, E2E_MAX_IN_FLIGHT, E2E_RATE};
use crate::support::{bench_config, claim_rebill, median, start_daemon_on, BenchResult, TAX};
use crate::{verdict, Knobs, Summary};

/// Rounds of the limit and the one-daemon drain, for their medians.
const ROUNDS: usize = 5;

/// A migrated database on the cluster, with a setup connection of its own (as a writer's).
async fn database(
    cluster: &cluster::ScratchCluster,
) -> BenchResult<(String, PgStore, PgConnection)> {
    let url = cluster.create_database().await?;
    let mut connect = PgConnect::new(url.clone());
    connect.pool_size = 4;
    let store = PgStore::connect_and_migrate(&connect).await?;
    let conn = PgConnection::connect(&url).await?;
    Ok((url, store, conn))
}

/// `n` due pending rows in one statement.
async fn insert_pending(conn: &mut PgConnection, prefix: &str, n: u64) -> BenchResult<()> {
    sqlx::query(
        "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) \
         SELECT $1 || g, $2, 0 FROM generate_series(1, $3) g",
    )
    .bind(prefix)
    .bind(TAX)
    .bind(n as i64)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// How many rows were completed more than once, or not at all (must be 0 and 0).
async fn completion_check(conn: &mut PgConnection) -> BenchResult<(i64, i64)> {
    let (not_done,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM rebill_orders WHERE status <> 'done'")
            .fetch_one(&mut *conn)
            .await?;
    let (twice,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM rebill_orders WHERE attempts <> 1")
        .fetch_one(&mut *conn)
        .await?;
    Ok((not_done, twice))
}

/// `claimers` loops of claim-64 / complete-64 on one table of `n` rows: rows/s.
async fn drain(cluster: &cluster::ScratchCluster, n: u64, claimers: usize) -> BenchResult<f64> {
    let (url, store, mut conn) = database(cluster).await?;
    insert_pending(&mut conn, "PG-", n).await?;
    sqlx::query("ANALYZE rebill_orders")
        .execute(&mut conn)
        .await?;
    let mut stores = vec![store];
    for _ in 1..claimers {
        let mut connect = PgConnect::new(url.clone());
        connect.pool_size = 4;
        stores.push(PgStore::connect(&connect).await?);
    }
    let t0 = Instant::now();
    let loops: Vec<_> = stores
        .iter()
        .cloned()
        .map(|s| {
            tokio::spawn(async move {
                claim_and_complete(&s, 64, 64)
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut rows = 0;
    for l in loops {
        rows += l.await?.map_err(|e| format!("claim loop: {e}"))?.rows;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let (not_done, twice) = completion_check(&mut conn).await?;
    for s in &stores {
        s.close().await;
    }
    if rows != n || not_done != 0 || twice != 0 {
        return Err(format!(
            "{claimers} claimers completed {rows} of {n} rows; {not_done} not done, {twice} attempted more than once"
        )
        .into());
    }
    Ok(rate)
}

/// Transactions committed in this connection's database so far (the server's statistics,
/// flushed within a second or so).
async fn commits(conn: &mut PgConnection) -> BenchResult<i64> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(n)
}

/// What an end-to-end drain measured.
struct EndToEnd {
    /// Rows per second, from the daemons' start to the last row done.
    rate: f64,
    /// Transactions the server committed per row.
    commits_per_row: f64,
}

/// `daemons` daemons draining one table of `n` rows through the zero-latency simulator.
async fn e2e(cluster: &cluster::ScratchCluster, n: u64, daemons: usize) -> BenchResult<EndToEnd> {
    let (url, store, mut conn) = database(cluster).await?;
    store.close().await;
    insert_pending(&mut conn, "E2E-", n).await?;
    sqlx::query("ANALYZE rebill_orders")
        .execute(&mut conn)
        .await?;
    let opts = SimOptions::default();
    let sim = Simulator::start(opts.clone()).await?;
    let unused = std::path::Path::new("unused.db");
    let mut config = bench_config(
        &sim,
        &opts,
        unused,
        E2E_MAX_IN_FLIGHT,
        E2E_RATE,
        E2E_CLAIM_BATCH,
    )?;
    config.database.url = Some(url.clone());
    let location = Location::Postgres(PgConnect::new(url));
    let mut stores = Vec::with_capacity(daemons);
    for _ in 0..daemons {
        stores.push(Database::open(&location).await?);
    }
    let commits_before = commits(&mut conn).await?;
    let t0 = Instant::now();
    let started_ms = now_ms();
    let running: Vec<_> = stores
        .into_iter()
        .map(|store| start_daemon_on(&config, store))
        .collect();
    let deadline = t0 + std::time::Duration::from_secs(300);
    // Watched seldom and through the active rows' index, so that watching takes little of
    // the CPU the daemons share; the drain's end is the last row's finished_at (the
    // database's clock, the same machine's).
    loop {
        let (left,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM rebill_orders WHERE status IN ('pending', 'running')",
        )
        .fetch_one(&mut conn)
        .await?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("{daemons} daemons left {left} of {n} rows undone after 300 s").into(),
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (last_ms,): (Option<i64>,) = sqlx::query_as("SELECT MAX(finished_at) FROM rebill_orders")
        .fetch_one(&mut conn)
        .await?;
    let elapsed = std::time::Duration::from_millis(
        u64::try_from(last_ms.unwrap_or(started_ms) - started_ms)
            .unwrap_or(0)
            .max(1),
    );
    for daemon in running {
        daemon.stop().await?;
    }
    // The statistics reach the view a moment after the transactions.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let committed = commits(&mut conn).await? - commits_before;
    let (not_done, twice) = completion_check(&mut conn).await?;
    let sent = sim.rebill_requests().len() as u64;
    sim.shutdown();
    conn.close().await?;
    if not_done != 0 || twice != 0 || sent != n {
        return Err(format!(
            "{daemons} daemons: {not_done} rows not done, {twice} attempted more than once, {sent} requests for {n} rows"
        )
        .into());
    }
    Ok(EndToEnd {
        rate: n as f64 / elapsed.as_secs_f64(),
        commits_per_row: committed as f64 / n as f64,
    })
}

/// The median time of a 64-row claim on a table with `finished` done rows, interleaved
/// with the other database's; put-backs not timed.
async fn claim_costs(
    cluster: &cluster::ScratchCluster,
    finished: [u64; 2],
    iterations: usize,
) -> BenchResult<[f64; 2]> {
    let mut dbs = Vec::new();
    for f in finished {
        let (_, store, mut conn) = database(cluster).await?;
        let t = Instant::now();
        sqlx::query(
            "INSERT INTO rebill_orders (orderno, tax_num, status, outcome, attempts, next_attempt_at, last_code, \
               last_message, created_at, updated_at, finished_at, recent_attempts) \
             SELECT 'DONE-' || g, $1, 'done', 'accepted', 1, $2 - g * 100, '0', '重试成功', \
               $2 - g * 100, $2 - g * 100 + 50, $2 - g * 100 + 50, '[' || ($2 - g * 100) || ']' \
             FROM generate_series(1, $3) g",
        )
        .bind(TAX)
        .bind(now_ms())
        .bind(f as i64)
        .execute(&mut conn)
        .await?;
        insert_pending(&mut conn, "PENDING-", 64).await?;
        sqlx::query("VACUUM ANALYZE rebill_orders")
            .execute(&mut conn)
            .await?;
        println!(
            "  [{f} finished] PostgreSQL database prepared in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        dbs.push((store, conn));
    }
    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..iterations + 20 {
        for (k, (store, _)) in dbs.iter().enumerate() {
            let token = format!("cost-{i}");
            let t = Instant::now();
            let batch = claim_rebill(store, &token, 64).await?;
            let took = t.elapsed();
            if batch.rows.len() != 64 {
                return Err(format!("claimed {} of 64 rows", batch.rows.len()).into());
            }
            let held: Vec<(i64, String)> = batch
                .rows
                .iter()
                .map(|r| (r.meta.id, r.meta.claim_token.clone()))
                .collect();
            let put_back = HeldParams {
                queue: QueueName::Rebill,
                held: &held,
                now: now_ms(),
            };
            QueueStore::release(store, put_back).await?;
            if i >= 20 {
                samples[k].push(took);
            }
        }
    }
    for (store, conn) in dbs {
        conn.close().await?;
        store.close().await;
    }
    Ok(samples.map(|mut s| {
        s.sort();
        s[s.len() / 2].as_secs_f64() * 1e6
    }))
}

/// Insert-to-wake latency through LISTEN/NOTIFY: `n` single-row inserts from a writer's
/// connection, 20 ms apart, each timed from the start of the insert (its round trip
/// included) to the watcher's tick; sorted, ms.
async fn pickup(cluster: &cluster::ScratchCluster, n: usize) -> BenchResult<Vec<f64>> {
    let (_, store, mut conn) = database(cluster).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut watch = store
        .watch_commits(std::time::Duration::from_secs(3600), stop.clone())
        .await?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let seen = *watch.wake.borrow_and_update();
        // Timed from before the insert: its notification can arrive before the writer's
        // own acknowledgement, so timing from the acknowledgement would show 0.
        let committed = Instant::now();
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES ($1, $2)")
            .bind(format!("WAKE-{i}"))
            .bind(TAX)
            .execute(&mut conn)
            .await?;
        while *watch.wake.borrow_and_update() == seen {
            tokio::time::timeout(std::time::Duration::from_secs(5), watch.wake.changed())
                .await
                .map_err(|_| "no wake-up within 5 s")??;
        }
        lat.push(committed.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = watch.task.await;
    store.close().await;
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

/// Section 7.
pub async fn run(knobs: &Knobs, summary: &mut Summary) -> BenchResult<()> {
    println!();
    println!("== 7. PostgreSQL store ==");
    let Some(cluster) = tokio::task::spawn_blocking(cluster::shared).await? else {
        println!(
            "  skipped: no PostgreSQL server binaries installed (Debian's postgresql package)"
        );
        return Ok(());
    };
    let n = knobs.rows(40_000);
    let e2e_rows = knobs.rows(20_000);
    // The limit, one daemon and two daemons end to end, interleaved in rounds: this
    // machine's speed drifts by a third between minutes, and the ratios compare medians
    // of one stretch.
    let (mut limits, mut singles, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let limit = drain(cluster, n, 1).await?;
        let single = e2e(cluster, e2e_rows, 1).await?;
        let pair = e2e(cluster, e2e_rows, 2).await?;
        println!(
            "  round {round}/{ROUNDS}: claim 64 / complete 64 loop (FOR UPDATE SKIP LOCKED, unnest) {limit:.0} rows/s over {n} rows; end to end over {e2e_rows} rows, zero-latency simulator: 1 daemon {:.0} rows/s ({:.0} % of the loop, {:.2} server transactions per row), 2 daemons {:.0} rows/s ({:.2}×, {:.2} per row); every row sent and completed exactly once",
            single.rate,
            single.rate / limit * 100.0,
            single.commits_per_row,
            pair.rate,
            pair.rate / single.rate,
            pair.commits_per_row
        );
        limits.push(limit);
        singles.push(single.rate);
        pairs.push(pair.rate);
    }
    let (one, single, pair) = (median(limits), median(singles), median(pairs));
    summary.add(
        7,
        "PostgreSQL claim-64/complete-64 loop, rows/s (storage limit, median)",
        format!("{one:.0}"),
        "(limit)",
    );
    summary.add(
        7,
        "PostgreSQL e2e 1 daemon (median), share of the limit (median)",
        format!("{single:.0} rows/s = {:.0} %", single / one * 100.0),
        format!(">= 50 % ({})", verdict(single >= one * 0.5)),
    );
    summary.add(
        7,
        "PostgreSQL e2e 2 daemons vs 1 (medians)",
        format!("{pair:.0} rows/s = {:.2}×", pair / single),
        format!(">= 1.0× ({})", verdict(pair >= single)),
    );
    for claimers in [2usize, 4] {
        let rate = drain(cluster, n, claimers).await?;
        println!(
            "  {claimers} claimers, each its own pool, claim 64 / complete 64: {rate:.0} rows/s over {n} rows; every row completed exactly once"
        );
        let ratio = rate / one;
        summary.add(
            7,
            format!("PostgreSQL {claimers} claimers on one table vs 1"),
            format!("{ratio:.2}×"),
            format!(">= 1.0× ({})", verdict(ratio >= 1.0)),
        );
    }
    let four = e2e(cluster, e2e_rows, 4).await?;
    println!(
        "  end to end, 4 daemons on one database, zero-latency simulator: {:.0} rows/s over {e2e_rows} rows, {:.2} server transactions per row; every row sent and completed exactly once",
        four.rate, four.commits_per_row
    );
    summary.add(
        7,
        "PostgreSQL e2e 4 daemons vs 1 (one run)",
        format!("{:.0} rows/s = {:.2}×", four.rate, four.rate / single),
        "(no target: 4 daemons share 2 cores)",
    );
    let lat = pickup(cluster, 200).await?;
    let (p50, max) = (lat[lat.len() / 2], lat[lat.len() - 1]);
    println!(
        "  insert-to-wake through LISTEN/NOTIFY ({} single-row inserts, 20 ms apart, timed from the start of the writer's insert, its round trip included): p50 {p50:.2} ms, p99 {:.2} ms, max {max:.2} ms",
        lat.len(),
        lat[lat.len() * 99 / 100]
    );
    summary.add(
        7,
        "PostgreSQL insert-to-wake p50 ms (LISTEN/NOTIFY)",
        format!("{p50:.2}"),
        format!("<= 10 ms ({})", verdict(p50 <= 10.0)),
    );
    summary.add(
        7,
        "PostgreSQL insert-to-wake max ms",
        format!("{max:.2}"),
        format!("<= 100 ms ({})", verdict(max <= 100.0)),
    );
    crate::pickup::on_postgres(cluster, knobs, summary).await?;
    let finished = [knobs.rows(1_000), knobs.rows(1_000_000)];
    let [small, large] = claim_costs(cluster, finished, 200).await?;
    let ratio = large / small;
    println!(
        "  claim of 64 rows: median {small:.0} µs with {} finished rows, {large:.0} µs with {} ({ratio:.2}×; interleaved, put-back not timed)",
        finished[0], finished[1]
    );
    summary.add(
        7,
        format!("PostgreSQL claim µs (64 rows), {} finished", finished[1]),
        format!("{large:.0}"),
        "(median)",
    );
    summary.add(
        7,
        "PostgreSQL claim cost ratio 1M vs 1k finished",
        format!("{ratio:.2}×"),
        format!("<= 1.5× ({})", verdict(ratio <= 1.5)),
    );
    Ok(())
}
