//! `/metrics` and `/healthz` moving with the queues, pauses and a database that goes away.

use super::*;
use invoice_worker::store::driver::{PauseParams, QueueStore as _};

on_both_backends!(metrics_and_health_move_with_the_queues);

async fn metrics_and_health_move_with_the_queues(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    let port = free_port();
    w.config.http.listen = Some(format!("127.0.0.1:{port}").parse().expect("socket address"));
    let daemon = w.start_alone_with_metrics().await;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");

    wait_until(
        Duration::from_secs(10),
        "/healthz to answer 200",
        || async {
            matches!(
                get(&client, &format!("{base}/healthz")).await,
                Some((200, _))
            )
        },
    )
    .await;
    let (_, body) = get(&client, &format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(body.trim(), "ok");

    let rebill_done = [("queue", "rebill"), ("action", "done")];
    let latency_count = "invoice_worker_request_duration_seconds_count";
    let before = scrape(&client, &base).await;
    let done_before = before
        .value("invoice_worker_attempts_total", &rebill_done)
        .unwrap_or(0.0);
    let calls_before = before
        .value(latency_count, &[("queue", "rebill")])
        .unwrap_or(0.0);

    // Attempts and depths move as rows are done.
    let ids = insert_rebills(&w, "METRICS-", 5, TAX).await;
    wait_done(&w, &ids, Duration::from_secs(20)).await;
    let depth = |s: &Scrape, status: &str| {
        s.value(
            "invoice_worker_queue_depth",
            &[("queue", "rebill"), ("status", status)],
        )
    };
    // The depths are counted by the daemon every 2 s, not per scrape.
    let after = scrape_until(&client, &base, "attempts and depths counted", |s| {
        s.value("invoice_worker_attempts_total", &rebill_done)
            .unwrap_or(0.0)
            >= done_before + 5.0
            && depth(s, "done") == Some(5.0)
    })
    .await;
    assert_eq!(depth(&after, "done"), Some(5.0), "{}", after.text);
    assert_eq!(depth(&after, "pending"), Some(0.0));
    assert_eq!(depth(&after, "running"), Some(0.0));
    assert_eq!(
        after.value(
            "invoice_worker_queue_depth",
            &[("queue", "title"), ("status", "pending")]
        ),
        Some(0.0)
    );
    assert!(
        after
            .value(latency_count, &[("queue", "rebill")])
            .unwrap_or(0.0)
            >= calls_before + 5.0,
        "{}",
        after.text
    );
    assert!(after
        .value(
            "invoice_worker_request_duration_seconds_bucket",
            &[("queue", "rebill"), ("le", "+Inf")]
        )
        .is_some());
    assert_eq!(
        after.value(
            "invoice_worker_oldest_pending_age_seconds",
            &[("queue", "rebill")]
        ),
        Some(0.0)
    );
    assert_eq!(
        after.value("invoice_worker_paused_sellers", &[("queue", "rebill")]),
        Some(0.0)
    );
    // No row awaits confirmation here ([rebill] confirm is off); confirm.rs counts them.
    assert_eq!(
        after.value(
            "invoice_worker_awaiting_confirmation",
            &[("queue", "rebill")]
        ),
        Some(0.0)
    );
    assert_eq!(
        after.value("invoice_worker_queue_paused", &[("queue", "rebill")]),
        Some(0.0)
    );
    assert!(
        after.text.contains("# HELP invoice_worker_attempts_total"),
        "{}",
        after.text
    );
    assert!(
        after
            .text
            .contains("# TYPE invoice_worker_request_duration_seconds histogram"),
        "{}",
        after.text
    );

    // A paused seller: the gauge says so, and its due row waits and ages.
    let until = now_ms() + 60_000;
    w.database
        .pause(PauseParams {
            queue: QueueName::Rebill,
            scope: OTHER_SELLER,
            until,
            reason: "test pause",
            now: now_ms(),
        })
        .await
        .expect("pause seller");
    let waiting = w.insert_rebill("METRICS-PAUSED", OTHER_SELLER).await;
    scrape_until(
        &client,
        &base,
        "a paused seller with an ageing pending row",
        |s| {
            s.value("invoice_worker_paused_sellers", &[("queue", "rebill")]) == Some(1.0)
                && depth(s, "pending") == Some(1.0)
                && s.value(
                    "invoice_worker_oldest_pending_age_seconds",
                    &[("queue", "rebill")],
                )
                .unwrap_or(0.0)
                    >= 0.3
        },
    )
    .await;
    // The whole queue paused.
    w.database
        .pause(PauseParams {
            queue: QueueName::Rebill,
            scope: "*",
            until,
            reason: "test pause",
            now: now_ms(),
        })
        .await
        .expect("pause queue");
    scrape_until(&client, &base, "the queue paused", |s| {
        s.value("invoice_worker_queue_paused", &[("queue", "rebill")]) == Some(1.0)
            && s.value("invoice_worker_queue_paused", &[("queue", "title")]) == Some(0.0)
    })
    .await;
    // Resumed: gauges back to 0 and the waiting row goes through.
    assert!(w
        .database
        .resume(QueueName::Rebill, "*", now_ms())
        .await
        .expect("resume queue"));
    assert!(w
        .database
        .resume(QueueName::Rebill, OTHER_SELLER, now_ms())
        .await
        .expect("resume seller"));
    wait_done(&w, &[waiting], Duration::from_secs(20)).await;
    scrape_until(&client, &base, "pauses lifted and the row done", |s| {
        s.value("invoice_worker_paused_sellers", &[("queue", "rebill")]) == Some(0.0)
            && s.value("invoice_worker_queue_paused", &[("queue", "rebill")]) == Some(0.0)
            && depth(s, "done") == Some(6.0)
            && depth(s, "pending") == Some(0.0)
            && s.value(
                "invoice_worker_oldest_pending_age_seconds",
                &[("queue", "rebill")],
            ) == Some(0.0)
    })
    .await;

    let (status, _) = get(&client, &format!("{base}/nope"))
        .await
        .expect("GET /nope");
    assert_eq!(status, 404);

    // The database goes away: /healthz says 503 and why.
    w.database.close().await;
    let (status, body) = get(&client, &format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("unhealthy: database"), "{body}");
    // The daemon cannot put anything back without its database; only its end matters here.
    daemon.token.cancel();
    let _ = daemon.handle.await;
}
