//! `[rebill] confirm`: accepted rows are called again until the gateway answers with the
//! invoice number, against the simulated gateway playing each sequence.

use std::time::Duration;

use crate::common::{Arg, Backend, World, TAX};
use invoice_worker::sim::{issued_invoice, RebillBehavior};
use invoice_worker::store::driver::QueueStore as _;
use invoice_worker::store::{now_ms, QueueName};

#[derive(Debug, sqlx::FromRow)]
struct Row {
    status: String,
    outcome: Option<String>,
    attempts: i64,
    last_message: Option<String>,
    invoice_no: Option<String>,
    invoice_down_url: Option<String>,
    confirm_since: Option<i64>,
}

async fn row(w: &World, id: i64) -> Row {
    let rows: Vec<Row> = w
        .writer
        .rows(
            "SELECT status, outcome, attempts, last_message, invoice_no, invoice_down_url, confirm_since \
             FROM rebill_orders WHERE id = $1",
            &[Arg::Int(id)],
        )
        .await;
    rows.into_iter().next().expect("row")
}

async fn updated_at(w: &World, id: i64) -> i64 {
    let rows: Vec<(i64,)> = w
        .writer
        .rows(
            "SELECT updated_at FROM rebill_orders WHERE id = $1",
            &[Arg::Int(id)],
        )
        .await;
    rows[0].0
}

on_both_backends!(
    accepted_rows_are_followed_to_their_invoice_number,
    a_number_never_seen_ends_done_accepted_when_the_period_runs_out,
    without_confirm_an_acceptance_is_done_at_once,
);

fn fail(message: &str) -> RebillBehavior {
    RebillBehavior::Fail {
        code: 9,
        message: message.to_string(),
    }
}

/// A world on `backend` whose rebill queue confirms on a fast schedule for `period`.
async fn confirming_world(backend: Backend, period: Duration) -> Option<World> {
    let mut w = World::on(backend).await?;
    w.config.rebill.confirm = true;
    w.config.rebill.confirm_schedule = vec![Duration::from_millis(150).into()];
    w.config.rebill.confirm_for = period;
    w.config.validate().expect("valid");
    Some(w)
}

async fn accepted_rows_are_followed_to_their_invoice_number(backend: Backend) {
    let Some(w) = confirming_world(backend, Duration::from_secs(60)).await else {
        return;
    };
    let in_progress = "开票中(重试中),请耐心等待开票结果";
    let scripts: [(&str, Vec<RebillBehavior>, usize); 3] = [
        // accepted → in progress → issued
        (
            "C-PROGRESS",
            vec![
                RebillBehavior::Accepted,
                fail(in_progress),
                RebillBehavior::Issued,
            ],
            3,
        ),
        // accepted → the retry failed again → accepted (a new retry) → issued
        (
            "C-AGAIN",
            vec![
                RebillBehavior::Accepted,
                fail("税控设备离线,开票失败"),
                RebillBehavior::Accepted,
                RebillBehavior::Issued,
            ],
            4,
        ),
        // "already generated" without the values: one more call brings code 100.
        (
            "C-GENERATED",
            vec![fail("发票已生成,无需再重试开票"), RebillBehavior::Issued],
            2,
        ),
    ];
    let mut ids = Vec::new();
    for (orderno, script, _) in &scripts {
        w.sim.script_rebill(orderno, script.clone());
        ids.push(w.insert_rebill(orderno, TAX).await);
    }
    let daemon = w.start().await;

    w.wait_finished("rebill_orders", &ids).await;
    daemon.stop().await;

    for ((orderno, _, calls), id) in scripts.iter().zip(&ids) {
        let r = row(&w, *id).await;
        let (invoice_no, url) = issued_invoice(orderno);
        assert_eq!(
            (r.status.as_str(), r.outcome.as_deref()),
            ("done", Some("issued")),
            "{orderno}: {r:?}"
        );
        assert_eq!(
            r.invoice_no.as_deref(),
            Some(invoice_no.as_str()),
            "{orderno}"
        );
        assert_eq!(
            r.invoice_down_url.as_deref(),
            Some(url.as_str()),
            "{orderno}"
        );
        let sent = w
            .sim
            .rebill_requests()
            .iter()
            .filter(|q| q.verified && q.orderno == *orderno)
            .count();
        assert_eq!(sent, *calls, "{orderno}: one call per scripted answer");
        // Confirmation checks use up no attempt: only the failed retry in C-AGAIN counts.
        let expected_attempts = if *orderno == "C-AGAIN" { 2 } else { 1 };
        assert_eq!(r.attempts, expected_attempts, "{orderno}: {r:?}");
    }
}

async fn a_number_never_seen_ends_done_accepted_when_the_period_runs_out(backend: Backend) {
    let Some(w) = confirming_world(backend, Duration::from_millis(1200)).await else {
        return;
    };
    w.sim
        .script_rebill("C-NEVER", vec![RebillBehavior::Accepted]);
    let id = w.insert_rebill("C-NEVER", TAX).await;
    let daemon = w.start().await;
    // While it waits, the row is pending, says so and names what it saw.
    let waiting = loop {
        let r = row(&w, id).await;
        if r.status == "pending" && r.outcome.is_some() {
            break r;
        }
        assert_ne!(
            r.status, "done",
            "finished before it was seen waiting: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(waiting.outcome.as_deref(), Some("accepted"));
    assert!(waiting.confirm_since.is_some(), "{waiting:?}");
    assert!(
        waiting
            .last_message
            .as_deref()
            .is_some_and(|m| m.contains("awaiting confirmation") && m.contains("重试成功")),
        "{waiting:?}"
    );
    // `status`, the systemd status line and the gauge read the same count, taken while the
    // row sat pending (no claim touched it between the two reads of `updated_at`).
    loop {
        let before = updated_at(&w, id).await;
        let counts = w
            .database
            .counts(QueueName::Rebill, now_ms())
            .await
            .expect("counts");
        let depths = invoice_worker::depths::Depths::new();
        depths
            .refresh(&w.database, now_ms(), true)
            .await
            .expect("count");
        let line = invoice_worker::depths::status_line(&depths.latest());
        let status = w.status_of("rebill_orders", id).await;
        assert_ne!(status, "done", "finished before its count was read");
        if updated_at(&w, id).await == before && status == "pending" {
            assert_eq!(counts.awaiting_confirmation, 1);
            assert!(line.contains("(1 awaiting confirmation)"), "{line}");
            break;
        }
    }
    w.wait_finished("rebill_orders", &[id]).await;
    let counts = w
        .database
        .counts(QueueName::Rebill, now_ms())
        .await
        .expect("counts");
    assert_eq!(counts.awaiting_confirmation, 0);
    daemon.stop().await;

    let r = row(&w, id).await;
    assert_eq!(
        (r.status.as_str(), r.outcome.as_deref()),
        ("done", Some("accepted")),
        "{r:?}"
    );
    assert!(
        r.last_message
            .as_deref()
            .is_some_and(|m| m.contains("never seen")),
        "{r:?}"
    );
    assert_eq!(r.invoice_no, None);
    let sent = w.sim.rebill_requests().len();
    // Checks every 150 ms for 1.2 s: the first call and up to eight checks, the last at
    // the end of the period (a busy machine makes some late, and a late one skips ahead).
    assert!((3..=10).contains(&sent), "{sent} calls");
    assert_eq!(r.attempts, 1, "{r:?}");
}

async fn without_confirm_an_acceptance_is_done_at_once(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let id = w.insert_rebill("C-OFF", TAX).await;
    let daemon = w.start().await;
    w.wait_finished("rebill_orders", &[id]).await;
    daemon.stop().await;
    let r = row(&w, id).await;
    assert_eq!(
        (r.status.as_str(), r.outcome.as_deref()),
        ("done", Some("accepted"))
    );
    assert_eq!((r.confirm_since, w.sim.rebill_requests().len()), (None, 1));
}
