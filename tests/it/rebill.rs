//! End-to-end tests of the rebilling queue: the daemon in-process, a real database (a
//! SQLite file, and PostgreSQL for every test not about SQLite itself) and the simulated
//! fw199 gateway over loopback HTTP.

use std::time::Duration;

use crate::common::{wait_until, Arg, Backend, World, TAX};
use invoice_worker::secret::Secret;
use invoice_worker::sim::{issued_invoice, RebillBehavior};
use invoice_worker::store::complete::{Completion, FinalStatus};
use invoice_worker::store::driver::{QueueStore as _, RescueParams};
use invoice_worker::store::now_ms;
use invoice_worker::store::pauses::PauseChange;
use invoice_worker::store::QueueName;

const OTHER_SELLER: &str = "91440300715267260A";

#[derive(Debug, sqlx::FromRow)]
struct Row {
    status: String,
    outcome: Option<String>,
    attempts: i64,
    last_code: Option<String>,
    last_message: Option<String>,
    invoice_no: Option<String>,
    invoice_down_url: Option<String>,
    finished_at: Option<i64>,
}

async fn row(w: &World, id: i64) -> Row {
    let rows: Vec<Row> = w
        .writer
        .rows(
            "SELECT status, outcome, attempts, last_code, last_message, invoice_no, invoice_down_url, finished_at \
             FROM rebill_orders WHERE id = $1",
            &[Arg::Int(id)],
        )
        .await;
    rows.into_iter().next().expect("row")
}

fn fail(code: i64, message: &str) -> RebillBehavior {
    RebillBehavior::Fail {
        code,
        message: message.to_string(),
    }
}

async fn wait_final(w: &World, ids: &[i64]) {
    w.wait_finished("rebill_orders", ids).await;
}

on_both_backends!(
    every_gateway_answer_reaches_its_outcome,
    invisible_characters_in_a_row_are_rejected_naming_the_code_point,
    invalid_rows_are_rejected_and_never_sent,
    wrong_secret_pauses_the_queue_without_burning_attempts,
    attempts_run_out_and_the_row_fails,
    retry_after_is_honoured,
    daily_cap_pushes_the_next_attempt_a_day_out,
    a_lost_claim_is_never_overwritten,
    rows_of_a_dead_daemon_are_rescued,
    operator_rules_come_before_the_built_in_ones,
    a_paused_sellers_rows_do_not_delay_another_sellers_retry,
    sms_login_pauses_the_seller_then_one_row_probes,
);

async fn every_gateway_answer_reaches_its_outcome(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let cases: Vec<(&str, Vec<RebillBehavior>, &str, Option<&str>)> = vec![
        (
            "ACC",
            vec![RebillBehavior::Accepted],
            "done",
            Some("accepted"),
        ),
        ("ISS", vec![RebillBehavior::Issued], "done", Some("issued")),
        (
            "STR",
            vec![RebillBehavior::CodeAsString],
            "done",
            Some("accepted"),
        ),
        (
            "GEN",
            vec![fail(9, "发票已生成,无需再重试开票")],
            "done",
            Some("issued"),
        ),
        (
            "INP",
            vec![fail(9, "开票中(重试中),请耐心等待开票结果")],
            "done",
            Some("in_progress"),
        ),
        (
            "FLAKY",
            vec![
                RebillBehavior::Status(500),
                RebillBehavior::Html,
                RebillBehavior::Garbage,
                RebillBehavior::Empty,
                RebillBehavior::WrongTypes,
                RebillBehavior::Oversized,
                RebillBehavior::Reset,
                RebillBehavior::Delay(Duration::from_secs(3)),
                RebillBehavior::Accepted,
            ],
            "done",
            Some("accepted"),
        ),
    ];
    let mut ids = Vec::new();
    for (orderno, script, _, _) in &cases {
        w.sim.script_rebill(orderno, script.clone());
        ids.push(w.insert_rebill(orderno, TAX).await);
    }
    let daemon = w.start().await;
    wait_final(&w, &ids).await;
    daemon.stop().await;

    for ((orderno, _, status, outcome), id) in cases.iter().zip(&ids) {
        let r = row(&w, *id).await;
        assert_eq!(r.status, *status, "{orderno}: {r:?}");
        assert_eq!(r.outcome.as_deref(), *outcome, "{orderno}: {r:?}");
        assert!(r.finished_at.is_some(), "{orderno}");
    }
    let issued = row(&w, ids[1]).await;
    let (invoice_no, url) = issued_invoice("ISS");
    assert_eq!(issued.invoice_no.as_deref(), Some(invoice_no.as_str()));
    assert_eq!(issued.invoice_down_url.as_deref(), Some(url.as_str()));
    assert_eq!(issued.last_code.as_deref(), Some("100"));
    let flaky = row(&w, ids[5]).await;
    assert_eq!(
        flaky.attempts, 9,
        "eight transient failures (one a timeout) then success: {flaky:?}"
    );
    // Every request the gateway saw was correctly signed.
    assert!(w
        .sim
        .rebill_requests()
        .iter()
        .all(|r| r.signature_ok && r.verified));
}

async fn invalid_rows_are_rejected_and_never_sent(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let cases = [
        ("has space", TAX, "orderno: contains whitespace"),
        ("tab\there", TAX, "orderno: contains whitespace"),
        (&*"x".repeat(65), TAX, "orderno: 65 characters"),
        ("ok-order", "12345", "tax_num: \"12345\" has 5 characters"),
        (
            "ok-order-2",
            "91310117568051222x",
            "only digits and capital letters",
        ),
    ];
    let mut ids = Vec::new();
    for (orderno, tax, _) in &cases {
        ids.push(w.insert_rebill(orderno, tax).await);
    }
    let daemon = w.start().await;
    wait_final(&w, &ids).await;
    daemon.stop().await;
    for ((orderno, _, reason), id) in cases.iter().zip(&ids) {
        let r = row(&w, *id).await;
        assert_eq!(r.status, "rejected", "{orderno}");
        let message = r.last_message.unwrap_or_default();
        assert!(message.contains(reason), "{orderno}: {message}");
    }
    assert!(
        w.sim.rebill_requests().is_empty(),
        "an invalid row reached the gateway"
    );
}

async fn sms_login_pauses_the_seller_then_one_row_probes(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    w.config.rebill.limits.seller_pause = Duration::from_millis(1500);
    w.config.rebill.limits.max_in_flight = 1;
    let sms = "本次操作需登录电子发票服务平台,请先使用短信验证码登录";
    w.sim
        .script_rebill("SMS-1", vec![fail(1, sms), RebillBehavior::Accepted]);
    let first = w.insert_rebill("SMS-1", OTHER_SELLER).await;
    let unrelated = w.insert_rebill("UNRELATED", TAX).await;
    let daemon = w.start().await;
    wait_until(Duration::from_secs(10), "the seller pause", || async {
        let pauses = w.database.pauses(now_ms()).await.expect("pauses");
        pauses.iter().any(|p| p.scope == OTHER_SELLER)
    })
    .await;
    // Due at once, while the seller is paused. SMS-1 fell due before them (its answer's
    // time), so it is the probe: one row, when the pause ends.
    let mut others = Vec::new();
    for i in 0..5 {
        others.push(
            w.insert_rebill(&format!("SMS-OTHER-{i}"), OTHER_SELLER)
                .await,
        );
    }
    let mut all = others.clone();
    all.push(first);
    all.push(unrelated);
    wait_final(&w, &all).await;
    daemon.stop().await;

    // While the seller was paused exactly one row probed per pause period; once a probe
    // succeeded the pause was lifted and the rest went out.
    let mut seller_sends: Vec<_> = w
        .sim
        .rebill_requests()
        .into_iter()
        .filter(|r| r.tax_num == OTHER_SELLER)
        .collect();
    seller_sends.sort_by_key(|r| r.received_at);
    let first_ok = seller_sends
        .iter()
        .position(|r| r.answered == "Accepted")
        .expect("a probe succeeded");
    assert_eq!(first_ok, 1, "the SMS answer came first: {seller_sends:?}");
    for pair in seller_sends[..=first_ok].windows(2) {
        let gap = pair[1].received_at - pair[0].received_at;
        assert!(
            gap >= Duration::from_millis(1400),
            "a row was sent {gap:?} into a seller pause"
        );
    }
    // The paused rows waited without using attempts: each was sent once, after the pause,
    // and the attempt the SMS answer paused was given back.
    assert_eq!(seller_sends.len(), 2 + others.len(), "{seller_sends:?}");
    assert!(
        seller_sends[..=first_ok]
            .iter()
            .all(|r| r.orderno == "SMS-1"),
        "only SMS-1 was sent while the seller was paused: {seller_sends:?}"
    );
    for id in &others {
        assert_eq!(row(&w, *id).await.attempts, 1);
    }
    assert_eq!(
        row(&w, first).await.attempts,
        1,
        "pausing refunds the attempt"
    );
    assert!(
        w.database
            .pauses(now_ms())
            .await
            .expect("pauses")
            .is_empty(),
        "the successful probe lifted the pause"
    );
    for id in all {
        assert_eq!(row(&w, id).await.status, "done");
    }
}

async fn wrong_secret_pauses_the_queue_without_burning_attempts(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    w.config.rebill.app_secret = Some(Secret::new("not-the-secret"));
    w.config.rebill.limits.queue_pause = Duration::from_secs(3600);
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(w.insert_rebill(&format!("Q-{i}"), TAX).await);
    }
    let daemon = w.start().await;
    wait_until(Duration::from_secs(10), "queue pause", || async {
        w.database
            .pauses(now_ms())
            .await
            .expect("pauses")
            .iter()
            .any(|p| p.scope == "*")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.stop().await;
    let sent = w.sim.rebill_requests().len();
    assert!(
        sent <= 16,
        "only the calls already in flight may go out; {sent} did"
    );
    assert!(w.sim.rebill_requests().iter().all(|r| !r.signature_ok));
    let burnt = w
        .count("SELECT CAST(COALESCE(SUM(attempts), 0) AS BIGINT) FROM rebill_orders")
        .await;
    assert_eq!(burnt, 0, "a config mistake must not use up attempts");
    assert_eq!(
        w.count("SELECT COUNT(*) FROM rebill_orders WHERE status = 'pending'")
            .await,
        10
    );

    // Fix the secret and resume: everything goes out.
    w.config.rebill.app_secret = Some(Secret::new(
        invoice_worker::sim::SimOptions::default().rebill_secret,
    ));
    assert!(w
        .database
        .resume(QueueName::Rebill, "*", now_ms())
        .await
        .expect("resume"));
    let daemon = w.start().await;
    wait_final(&w, &ids).await;
    daemon.stop().await;
    assert_eq!(
        w.count("SELECT COUNT(*) FROM rebill_orders WHERE status = 'done'")
            .await,
        10
    );
}

async fn attempts_run_out_and_the_row_fails(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    w.sim
        .script_rebill("DOOMED", vec![RebillBehavior::Status(502)]);
    let id = w
        .writer
        .insert_id(
            "INSERT INTO rebill_orders (orderno, tax_num, max_attempts) VALUES ('DOOMED', $1, 3) RETURNING id",
            &[Arg::text(TAX)],
        )
        .await;
    let daemon = w.start().await;
    wait_final(&w, &[id]).await;
    daemon.stop().await;
    let r = row(&w, id).await;
    assert_eq!(r.status, "failed");
    assert_eq!(r.attempts, 3);
    assert!(r
        .last_message
        .unwrap_or_default()
        .contains("gave up after 3 attempts"));
    assert_eq!(w.sim.rebill_requests().len(), 3);
}

async fn retry_after_is_honoured(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    w.sim.script_rebill(
        "BUSY",
        vec![
            RebillBehavior::TooMany {
                retry_after_secs: 1,
            },
            RebillBehavior::Accepted,
        ],
    );
    let id = w.insert_rebill("BUSY", TAX).await;
    let daemon = w.start().await;
    wait_final(&w, &[id]).await;
    daemon.stop().await;
    let sends = w.sim.rebill_requests();
    assert_eq!(sends.len(), 2);
    let gap = sends[1].received_at - sends[0].received_at;
    assert!(
        gap >= Duration::from_millis(950),
        "resent after {gap:?}, before Retry-After"
    );
    assert_eq!(row(&w, id).await.status, "done");
}

async fn daily_cap_pushes_the_next_attempt_a_day_out(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    w.sim
        .script_rebill("CAP", vec![fail(1, "E9613 该订单今日重试已达20次")]);
    let id = w.insert_rebill("CAP", TAX).await;
    let daemon = w.start().await;
    wait_until(Duration::from_secs(10), "first attempt", || async {
        row(&w, id).await.attempts == 1 && w.status_of("rebill_orders", id).await == "pending"
    })
    .await;
    daemon.stop().await;
    let next: Vec<(i64,)> = w
        .writer
        .rows(
            "SELECT next_attempt_at FROM rebill_orders WHERE id = $1",
            &[Arg::Int(id)],
        )
        .await;
    let (next,) = next[0];
    let wait = next - now_ms();
    assert!(wait > 23 * 3600 * 1000, "next attempt in {wait} ms");
}

async fn a_lost_claim_is_never_overwritten(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let id = w.insert_rebill("FENCED", TAX).await;
    let now = now_ms();
    let first = w
        .claim_rebill_as(now, Duration::from_millis(1), "old-holder", "daemon-a")
        .await;
    assert_eq!(first.rows.len(), 1);
    // The lease runs out (PostgreSQL judges it by its own clock: let it run out there
    // too), another daemon rescues and re-claims the row.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = now + 20;
    let rescue = RescueParams {
        queue: QueueName::Rebill,
        now: later,
        default_max_attempts: 50,
    };
    assert_eq!(w.database.rescue_expired(rescue).await.expect("rescue"), 1);
    let second = w
        .claim_rebill_as(later, Duration::from_secs(30), "new-holder", "daemon-b")
        .await;
    assert_eq!(second.rows.len(), 1);
    assert_eq!(
        second.rows[0].meta.attempts, 2,
        "attempts are counted at claim"
    );

    let done_by = |token: &str| Completion {
        id,
        claim_token: token.to_string(),
        status: FinalStatus::Done,
        outcome: Some("accepted"),
        next_attempt_at: later,
        refund_attempt: false,
        last_code: Some("0".into()),
        last_message: Some(format!("by {token}")),
        invoice_no: None,
        invoice_down_url: None,
        recent_attempts: None,
        pause: PauseChange::Nothing,
        confirm_since: None,
        attempt: None,
        now: later,
    };
    let applied = w
        .database
        .complete(QueueName::Rebill, &[done_by("old-holder")])
        .await
        .expect("complete");
    assert_eq!(
        applied,
        vec![false],
        "the old holder's result must be refused"
    );
    assert_eq!(w.status_of("rebill_orders", id).await, "running");
    let applied = w
        .database
        .complete(QueueName::Rebill, &[done_by("new-holder")])
        .await
        .expect("complete");
    assert_eq!(applied, vec![true]);
    let r = row(&w, id).await;
    assert_eq!(
        (r.status.as_str(), r.last_message.as_deref()),
        ("done", Some("by new-holder"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_query_uses_its_index() {
    let w = World::new().await;
    for queue in [QueueName::Rebill, QueueName::Title] {
        let plan = w.store().explain_claim(queue).await.expect("plan");
        let text: Vec<&str> = plan.iter().map(String::as_str).collect();
        let due_index = format!("{}_due", queue.table());
        assert!(
            text.iter().any(|d| d.contains(&due_index)),
            "claim of {} does not use {due_index}: {text:#?}",
            queue.as_str()
        );
        assert!(
            !text
                .iter()
                .any(|d| d.starts_with(&format!("SCAN {}", queue.table()))),
            "claim of {} scans the table: {text:#?}",
            queue.as_str()
        );
    }
}

async fn rows_of_a_dead_daemon_are_rescued(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    w.config.worker.lease = Duration::from_secs(1);
    let id = w.insert_rebill("ORPHAN", TAX).await;
    // Another daemon claimed the row and died: its lease is about to run out.
    w.claim_rebill_as(now_ms(), Duration::from_millis(500), "dead", "dead-daemon")
        .await;
    let started = std::time::Instant::now();
    let daemon = w.start().await;
    wait_final(&w, &[id]).await;
    daemon.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "rescued after {:?}",
        started.elapsed()
    );
    let r = row(&w, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("done", 2));
}

async fn operator_rules_come_before_the_built_in_ones(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    w.config.rebill.rules = vec![invoice_worker::queue::rules::MessageRule {
        contains: "维护".into(),
        action: "fail".into(),
        after: None,
    }];
    w.sim.script_rebill("MAINT", vec![fail(1, "系统维护中")]);
    let id = w.insert_rebill("MAINT", TAX).await;
    let daemon = w.start().await;
    wait_final(&w, &[id]).await;
    daemon.stop().await;
    let r = row(&w, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_rejected_and_does_not_stop_the_queue() {
    let w = World::new().await;
    // Written around the CHECK constraints, as an old schema or a careless tool might.
    let mut conn = w.sql().acquire().await.expect("conn");
    sqlx::query("PRAGMA ignore_check_constraints = ON")
        .execute(&mut *conn)
        .await
        .expect("pragma");
    let poison = sqlx::query(
        "INSERT INTO rebill_orders (orderno, tax_num, max_attempts) VALUES ('POISON', ?1, 'abc')",
    )
    .bind(TAX)
    .execute(&mut *conn)
    .await
    .expect("insert")
    .last_insert_rowid();
    sqlx::query("PRAGMA ignore_check_constraints = OFF")
        .execute(&mut *conn)
        .await
        .expect("pragma");
    drop(conn);
    let good = w.insert_rebill("GOOD", TAX).await;
    let daemon = w.start().await;
    wait_final(&w, &[poison, good]).await;
    daemon.stop().await;
    assert_eq!(row(&w, good).await.status, "done");
    let r = row(&w, poison).await;
    assert_eq!(r.status, "rejected");
    assert!(r.last_message.unwrap_or_default().contains("max_attempts"));
}

/// The `-wal` file stays well under its limit through a drain and is given back once the
/// daemon is quiet. (It used to grow by 23–40 KB per drained row and never shrink: every
/// checkpoint ran just before one of the daemon's own commits, so the WAL was never reset.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_small_while_draining_and_shrinks_when_idle() {
    const ROWS: i64 = 6_000;
    let mut w = World::new().await;
    w.config.rebill.limits.max_in_flight = 64;
    w.config.worker.claim_batch = 64;
    sqlx::query(
        "INSERT INTO rebill_orders (orderno, tax_num) \
         WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
         SELECT 'WAL-' || i, ?2 FROM s",
    )
    .bind(ROWS)
    .bind(TAX)
    .execute(w.sql())
    .await
    .expect("insert");
    let daemon = w.start().await;
    let mut largest = 0u64;
    let started = std::time::Instant::now();
    loop {
        largest = largest.max(w.store().wal_size());
        let open = w
            .count("SELECT COUNT(*) FROM rebill_orders WHERE status IN ('pending', 'running')")
            .await;
        if open == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{open} rows still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = started.elapsed();
    wait_until(
        Duration::from_secs(10),
        "the WAL given back once quiet",
        || async { w.store().wal_size() == 0 },
    )
    .await;
    daemon.stop().await;
    eprintln!(
        "{ROWS} rows drained in {drained:?}; largest -wal file {:.2} MiB (limit {} MiB); 0 bytes once quiet",
        largest as f64 / 1048576.0,
        w.store().wal_limit() / 1048576
    );
    // Half the limit, for margin: the growth the fix removed would be 140–240 MB here.
    assert!(
        largest < w.store().wal_limit() / 2,
        "largest -wal file {largest} bytes"
    );
}

/// A pending row no claim could ever take (a text `next_attempt_at`, written around the
/// CHECKs: SQLite's column types allow it, PostgreSQL's do not) becomes `rejected` naming
/// the column, and the queue goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_row_is_rejected_with_the_reason() {
    let w = World::new().await;
    {
        use sqlx::Connection;
        let mut other = crate::common::other_connection(&w.config.database.path).await;
        sqlx::query("PRAGMA ignore_check_constraints = ON")
            .execute(&mut other)
            .await
            .expect("pragma");
        sqlx::query(
            "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) VALUES ('SOON', ?1, 'soon')",
        )
        .bind(TAX)
        .execute(&mut other)
        .await
        .expect("insert");
        other.close().await.expect("close");
    }
    let soon = w
        .count("SELECT id FROM rebill_orders WHERE orderno = 'SOON'")
        .await;
    let good = w.insert_rebill("GOOD", TAX).await;
    let daemon = w.start().await;
    wait_final(&w, &[soon, good]).await;
    daemon.stop().await;
    let r = row(&w, soon).await;
    assert_eq!(r.status, "rejected");
    let message = r.last_message.unwrap_or_default();
    assert!(
        message.contains("next_attempt_at") && message.contains("'soon'"),
        "{message}"
    );
    assert_only_the_sound_row_went_out(&w, good).await;
}

/// The row `good` (order GOOD) is done and was the only one sent.
async fn assert_only_the_sound_row_went_out(w: &World, good: i64) {
    assert_eq!(row(w, good).await.status, "done");
    let sent: Vec<String> = w
        .sim
        .rebill_requests()
        .into_iter()
        .map(|r| r.orderno)
        .collect();
    assert_eq!(sent, ["GOOD"], "only the sound row was sent");
}

/// An order number with an invisible format character (U+202E, U+200F) is refused naming
/// the code point, never sent; the sound row beside it goes out.
async fn invisible_characters_in_a_row_are_rejected_naming_the_code_point(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let rlo = w.insert_rebill("A2024\u{202E}001", TAX).await;
    let rlm = w.insert_rebill("A2024\u{200F}002", TAX).await;
    let good = w.insert_rebill("GOOD", TAX).await;
    let daemon = w.start().await;
    wait_final(&w, &[rlo, rlm, good]).await;
    daemon.stop().await;
    for (id, code) in [(rlo, "U+202E"), (rlm, "U+200F")] {
        let r = row(&w, id).await;
        assert_eq!(r.status, "rejected");
        let message = r.last_message.unwrap_or_default();
        assert!(
            message.starts_with("orderno:") && message.contains(code),
            "{message}"
        );
    }
    assert_only_the_sound_row_went_out(&w, good).await;
}

/// A paused seller's due rows do not hold up another seller's retry: the idle loop still
/// wakes when that retry falls due (100 ms here), not only on its two-second tick.
async fn a_paused_sellers_rows_do_not_delay_another_sellers_retry(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let sms = "本次操作需登录电子发票服务平台,请先使用短信验证码登录";
    w.sim.script_rebill("PAUSED-1", vec![fail(1, sms)]);
    let paused = w.insert_rebill("PAUSED-1", OTHER_SELLER).await;
    w.insert_rebill("PAUSED-2", OTHER_SELLER).await;
    let daemon = w.start().await;
    wait_until(Duration::from_secs(10), "the seller paused", || async {
        row(&w, paused).await.last_message.is_some()
    })
    .await;
    w.sim
        .script_rebill("FLAKY", vec![fail(9, "系统繁忙"), RebillBehavior::Accepted]);
    let inserted = std::time::Instant::now();
    let flaky = w.insert_rebill("FLAKY", TAX).await;
    wait_final(&w, &[flaky]).await;
    let took = inserted.elapsed();
    daemon.stop().await;
    assert_eq!(row(&w, flaky).await.status, "done");
    // Held behind the paused seller's rows it would wait out their pause (30 minutes);
    // its own retry is 100 ms. The bound leaves room for a machine busy with other tests.
    assert!(
        took < Duration::from_secs(5),
        "a 100 ms retry took {took:?} while another seller was paused"
    );
}

/// Hosts disagree about the time; on PostgreSQL the database's clock decides. A daemon an
/// hour behind and one an hour ahead each drain the queue as one on time would: rows
/// inserted now are due at once, a Retry-After of one second waits one second (not none,
/// not an hour), every time written is the database's, and another host's lease is not cut
/// short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_clock_an_hour_off_changes_nothing_on_postgresql() {
    let Some(w) = World::on(Backend::Postgres).await else {
        return;
    };
    const HOUR: i64 = 3_600_000;
    for (offset, name) in [(-HOUR, "behind"), (HOUR, "ahead")] {
        // Another host's row under a 60 s lease, claimed before the others are inserted.
        let held = w.insert_rebill(&format!("HELD-{name}"), TAX).await;
        let token = format!("held-{name}");
        let claimed = w
            .claim_rebill_as(now_ms(), Duration::from_secs(60), &token, "other-host")
            .await;
        assert_eq!(claimed.rows.len(), 1);
        let busy = format!("BUSY-{name}");
        w.sim.script_rebill(
            &busy,
            vec![
                RebillBehavior::TooMany {
                    retry_after_secs: 1,
                },
                RebillBehavior::Accepted,
            ],
        );
        let started = now_ms();
        let mut ids = vec![w.insert_rebill(&busy, TAX).await];
        for k in 0..10 {
            ids.push(w.insert_rebill(&format!("SKEW-{name}-{k}"), TAX).await);
        }
        let daemon = w
            .start_on_clock(invoice_worker::clock::Clock::skewed(offset))
            .await;
        wait_final(&w, &ids).await;
        // The rescuer runs every second here: a host an hour ahead that judged leases by
        // its own clock would have taken the held row by now.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        daemon.stop().await;
        let ended = now_ms();

        let sends: Vec<_> = w
            .sim
            .rebill_requests()
            .into_iter()
            .filter(|r| r.orderno == busy)
            .collect();
        assert_eq!(sends.len(), 2, "{name}: the busy row was sent twice");
        let gap = sends[1].received_at - sends[0].received_at;
        assert!(
            gap >= Duration::from_millis(950),
            "{name}: resent after {gap:?}, before Retry-After"
        );
        for id in &ids {
            let r = row(&w, *id).await;
            assert_eq!(r.status, "done", "{name}: row {id}");
            let finished = r.finished_at.expect("finished_at");
            assert!(
                (started - 5_000..=ended + 5_000).contains(&finished),
                "{name}: finished_at {finished} is not the database's time ({started}..{ended})"
            );
        }
        let history: Vec<(i64,)> = w
            .writer
            .rows(
                "SELECT started_at FROM attempt_history WHERE queue = 'rebill' AND row_id = $1 ORDER BY attempt",
                &[Arg::Int(ids[0])],
            )
            .await;
        let times: Vec<i64> = history.into_iter().map(|(t,)| t).collect();
        assert_eq!(times.len(), 2, "{name}: both attempts in the history");
        assert!(
            times
                .iter()
                .all(|t| (started - 5_000..=ended + 5_000).contains(t)),
            "{name}: attempts recorded at {times:?}, not the database's time ({started}..{ended})"
        );
        assert!(
            times[1] - times[0] >= 950,
            "{name}: the recorded attempts are {} ms apart",
            times[1] - times[0]
        );
        let r = row(&w, held).await;
        assert_eq!(
            (r.status.as_str(), r.attempts),
            ("running", 1),
            "{name}: the other host's row is still its own"
        );
        let holder: Vec<(Option<String>,)> = w
            .writer
            .rows(
                "SELECT claim_token FROM rebill_orders WHERE id = $1",
                &[Arg::Int(held)],
            )
            .await;
        assert_eq!(holder[0].0.as_deref(), Some(token.as_str()));
    }
}
