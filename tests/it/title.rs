//! End-to-end tests of the title queue: the daemon in-process, a real database (a SQLite
//! file, then PostgreSQL) and the simulated 开票精灵 platform (TokenAction, OpenAction, thirdApi) over loopback HTTP.

use std::time::Duration;

use crate::common::{wait_until, Arg, Backend, World, TAX};
use invoice_worker::config::DataType;
use invoice_worker::sim::{RebillBehavior, SimOptions, TitleBehavior};
use invoice_worker::store::admin::NewTitle;
use invoice_worker::store::driver::QueueStore as _;
use invoice_worker::title_fields::TitleFields;

#[derive(Debug, sqlx::FromRow)]
struct Row {
    status: String,
    outcome: Option<String>,
    attempts: i64,
    ttqqlsh: Option<String>,
    last_code: Option<String>,
    last_message: Option<String>,
}

async fn row(w: &World, id: i64) -> Row {
    let rows: Vec<Row> = w
        .writer
        .rows(
            "SELECT status, outcome, attempts, ttqqlsh, last_code, last_message FROM title_submissions WHERE id = $1",
            &[Arg::Int(id)],
        )
        .await;
    rows.into_iter().next().expect("row")
}

fn title(order_no: &str, gmf_mc: &str) -> NewTitle {
    NewTitle {
        fields: TitleFields {
            order_no: order_no.to_string(),
            invoice_type: "1".to_string(),
            attach: "661234567890".to_string(),
            gmf_mc: gmf_mc.to_string(),
            gmf_dh: Some("13800138000".to_string()),
            gmf_yhzh: Some("6225880123456789".to_string()),
            ..TitleFields::default()
        },
        ..NewTitle::default()
    }
}

async fn wait_final(w: &World, ids: &[i64]) {
    w.wait_finished("title_submissions", ids).await;
}

on_both_backends!(
    titles_are_sent_in_json_and_xml_with_escaping_intact,
    config_default_format_applies_to_rows_without_one,
    a_timed_out_send_that_arrived_counts_as_sent_on_retry,
    a_duplicate_serial_on_the_first_attempt_fails,
    every_invalid_title_is_rejected_with_its_reason,
    lenient_tax_id_accepts_sandbox_codes,
    transient_failures_retry_with_the_same_serial,
    refused_client_credentials_pause_the_title_queue,
    both_queues_drain_at_once,
    token_expiry_mid_run_renews_once_and_resends,
);

async fn titles_are_sent_in_json_and_xml_with_escaping_intact(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let tricky = "A&B <贸易> \"引号\" 'x' +/= 公司";
    let mut json = title("T-JSON", tricky);
    json.data_type = Some(0);
    let mut xml = title("T-XML", tricky);
    xml.data_type = Some(1);
    let mut special = title("T-SPECIAL", "深圳某某电子有限公司");
    special.fields.invoice_type = "2".into();
    special.fields.gmf_nsrsbh = Some("9144030071526726XG".into());
    special.sqm = Some("ROW-SQM".into());
    let ids = vec![
        w.database.enqueue_title(&json).await.expect("insert"),
        w.database.enqueue_title(&xml).await.expect("insert"),
        w.database.enqueue_title(&special).await.expect("insert"),
    ];
    let daemon = w.start().await;
    wait_final(&w, &ids).await;
    daemon.stop().await;

    for id in &ids {
        let r = row(&w, *id).await;
        assert_eq!(
            (r.status.as_str(), r.outcome.as_deref()),
            ("done", Some("sent")),
            "{r:?}"
        );
        assert_eq!(r.last_code.as_deref(), Some("0000"));
        let serial = r.ttqqlsh.expect("serial generated and stored");
        assert!(serial.len() <= 20 && serial.starts_with("IW"), "{serial}");
    }
    let records = w.sim.title_requests();
    let by_order = |o: &str| {
        records
            .iter()
            .find(|r| r.order_no == o)
            .expect("sent")
            .clone()
    };
    let j = by_order("T-JSON");
    let x = by_order("T-XML");
    assert_eq!((j.data_type.as_str(), x.data_type.as_str()), ("0", "1"));
    assert_eq!(
        j.gmf_mc, tricky,
        "JSON payload survived Base64 + URL encoding"
    );
    assert_eq!(x.gmf_mc, tricky, "XML escaping round-tripped");
    assert!(records.iter().all(|r| r.payload_ok));
    assert_eq!(
        by_order("T-SPECIAL").sqm,
        "ROW-SQM",
        "a row's sqm overrides the default"
    );
    assert_eq!(j.sqm, "TEST-SQM");
    assert_eq!(w.sim.token_requests(), 1, "one token for all sends");
}

async fn config_default_format_applies_to_rows_without_one(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    w.config.title.data_type = DataType::Xml;
    let id = w
        .database
        .enqueue_title(&title("T-DEFAULT", "默认格式公司"))
        .await
        .expect("insert");
    let daemon = w.start().await;
    wait_final(&w, &[id]).await;
    daemon.stop().await;
    assert_eq!(w.sim.title_requests()[0].data_type, "1");
}

async fn token_expiry_mid_run_renews_once_and_resends(backend: Backend) {
    let options = SimOptions {
        token_reply_401: true,
        ..SimOptions::default()
    };
    let Some(w) = World::on_with_options(backend, options).await else {
        return;
    };
    let daemon = w.start().await;
    let first = w
        .database
        .enqueue_title(&title("T-BEFORE", "之前公司"))
        .await
        .expect("insert");
    wait_final(&w, &[first]).await;
    assert_eq!(w.sim.token_requests(), 1);
    w.sim.expire_tokens();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            w.database
                .enqueue_title(&title(&format!("T-AFTER-{i}"), "之后公司"))
                .await
                .expect("insert"),
        );
    }
    wait_final(&w, &ids).await;
    daemon.stop().await;
    for id in ids {
        let r = row(&w, id).await;
        assert_eq!((r.status.as_str(), r.attempts), ("done", 1), "{r:?}");
    }
    assert_eq!(
        w.sim.token_requests(),
        2,
        "ten rejected sends caused one renewal"
    );
}

async fn a_timed_out_send_that_arrived_counts_as_sent_on_retry(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    w.config.title.limits.timeout = Duration::from_millis(500);
    w.sim.script_title(
        "T-LATE",
        vec![
            TitleBehavior::Late(Duration::from_secs(2)),
            TitleBehavior::Ok,
        ],
    );
    let id = w
        .database
        .enqueue_title(&title("T-LATE", "超时公司"))
        .await
        .expect("insert");
    let daemon = w.start().await;
    wait_final(&w, &[id]).await;
    daemon.stop().await;
    let r = row(&w, id).await;
    assert_eq!(
        (r.status.as_str(), r.outcome.as_deref(), r.attempts),
        ("done", Some("sent"), 2),
        "{r:?}"
    );
    let message = r.last_message.unwrap_or_default();
    assert!(
        message.contains("重复") || message.contains("already"),
        "{message}"
    );
    let sends: Vec<_> = w
        .sim
        .title_requests()
        .into_iter()
        .filter(|t| t.order_no == "T-LATE")
        .collect();
    assert_eq!(sends.len(), 2);
    assert_eq!(
        sends[0].ttqqlsh, sends[1].ttqqlsh,
        "the retry reused the stored serial"
    );
    assert_eq!(
        w.sim
            .accepted_serials()
            .iter()
            .filter(|s| **s == sends[0].ttqqlsh)
            .count(),
        1
    );
}

async fn a_duplicate_serial_on_the_first_attempt_fails(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let mut a = title("T-A", "甲公司");
    a.fields.ttqqlsh = Some("IWDUP0000000000001".into());
    let id_a = w.database.enqueue_title(&a).await.expect("insert");
    let daemon = w.start().await;
    wait_final(&w, &[id_a]).await;
    // Another system reuses the serial under a different order (the unique column lets a
    // finished row's serial be deleted and reused): the server says it is a duplicate.
    w.writer
        .execute(
            "DELETE FROM title_submissions WHERE id = $1",
            &[Arg::Int(id_a)],
        )
        .await;
    let mut b = title("T-B", "乙公司");
    b.fields.ttqqlsh = Some("IWDUP0000000000001".into());
    let id_b = w.database.enqueue_title(&b).await.expect("insert");
    wait_final(&w, &[id_b]).await;
    daemon.stop().await;
    let r = row(&w, id_b).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 1), "{r:?}");
}

async fn every_invalid_title_is_rejected_with_its_reason(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let long = |n: usize| "长".repeat(n);
    let mut cases: Vec<(NewTitle, &str)> = Vec::new();
    let mut t = title("V-1", "x");
    t.fields.gmf_mc = "   ".into();
    cases.push((t, "GMF_MC"));
    let mut t = title("V-2", &long(101));
    t.fields.order_no = "V-2".into();
    cases.push((t, "GMF_MC: 101 characters"));
    let mut t = title("V-3", "公司");
    t.fields.attach = "A".repeat(21);
    cases.push((t, "ATTACH"));
    let mut t = title("V-4", "公司");
    t.fields.ttqqlsh = Some("S".repeat(21));
    cases.push((t, "TTQQLSH"));
    let mut t = title("V-5", "公司");
    t.fields.invoice_type = "2".into();
    cases.push((t, "GMF_NSRSBH"));
    let mut t = title("V-6", "公司");
    t.fields.gmf_nsrsbh = Some("91110000600037341N".into());
    cases.push((t, "check digit"));
    let mut t = title("V-7", "公司");
    t.fields.gmf_nsrsbh = Some("1234".into());
    cases.push((t, "GMF_NSRSBH"));
    let mut t = title("V-8", "公司");
    t.fields.remark = Some(long(201));
    cases.push((t, "REMARK"));
    let mut t = title("V-9", "公司");
    t.fields.gmf_dz = Some(long(101));
    cases.push((t, "GMF_DZ"));
    let mut t = title("V-10", "公司");
    t.fields.by2 = Some(long(201));
    cases.push((t, "BY2"));
    let mut t = title("V-11", "公司");
    t.fields.attach = " ".into();
    cases.push((t, "ATTACH"));
    let mut ids = Vec::new();
    for (t, _) in &cases {
        ids.push(w.database.enqueue_title(t).await.expect("insert"));
    }
    let daemon = w.start().await;
    wait_final(&w, &ids).await;
    daemon.stop().await;
    for ((t, reason), id) in cases.iter().zip(&ids) {
        let r = row(&w, *id).await;
        assert_eq!(r.status, "rejected", "{}: {r:?}", t.fields.order_no);
        let message = r.last_message.unwrap_or_default();
        assert!(message.contains(reason), "{}: {message}", t.fields.order_no);
        assert!(
            !message.contains("13800138000") && !message.contains("6225880123456789"),
            "{message}"
        );
    }
    assert!(
        w.sim.title_requests().is_empty(),
        "an invalid title reached the server"
    );
}

async fn lenient_tax_id_accepts_sandbox_codes(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    w.config.title.lenient_tax_id = true;
    let mut t = title("V-LENIENT", "公司");
    t.fields.gmf_nsrsbh = Some("91110000600037341N".into());
    let id = w.database.enqueue_title(&t).await.expect("insert");
    let daemon = w.start().await;
    wait_final(&w, &[id]).await;
    daemon.stop().await;
    assert_eq!(row(&w, id).await.status, "done");
}

async fn transient_failures_retry_with_the_same_serial(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    w.sim.script_title(
        "T-FLAKY",
        vec![
            TitleBehavior::Status(502),
            TitleBehavior::Garbage,
            TitleBehavior::Reset,
            TitleBehavior::Code1000,
        ],
    );
    w.sim.script_title("T-ALT", vec![TitleBehavior::AltShape]);
    let ids = vec![
        w.database
            .enqueue_title(&title("T-FLAKY", "重试公司"))
            .await
            .expect("insert"),
        w.database
            .enqueue_title(&title("T-ALT", "另一种格式公司"))
            .await
            .expect("insert"),
    ];
    let daemon = w.start().await;
    wait_final(&w, &ids).await;
    daemon.stop().await;
    let r = row(&w, ids[0]).await;
    assert_eq!((r.status.as_str(), r.attempts), ("done", 4), "{r:?}");
    let serials: Vec<String> = w
        .sim
        .title_requests()
        .into_iter()
        .filter(|t| t.order_no == "T-FLAKY")
        .map(|t| t.ttqqlsh)
        .collect();
    assert_eq!(serials.len(), 4);
    assert!(serials.iter().all(|s| *s == serials[0]), "{serials:?}");
    assert_eq!(row(&w, ids[1]).await.status, "done");
}

async fn refused_client_credentials_pause_the_title_queue(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    w.config.title.client_secret = Some(invoice_worker::secret::Secret::new("wrong-client-secret"));
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            w.database
                .enqueue_title(&title(&format!("T-CRED-{i}"), "公司"))
                .await
                .expect("insert"),
        );
    }
    let daemon = w.start().await;
    wait_until(Duration::from_secs(10), "title queue pause", || async {
        w.database
            .pauses(invoice_worker::store::now_ms())
            .await
            .expect("pauses")
            .iter()
            .any(|p| p.queue == "title" && p.scope == "*")
    })
    .await;
    daemon.stop().await;
    assert!(
        w.sim.title_requests().is_empty(),
        "nothing sent without a token"
    );
    assert_eq!(
        w.count("SELECT CAST(COALESCE(SUM(attempts), 0) AS BIGINT) FROM title_submissions")
            .await,
        0
    );
    assert!(
        w.sim.token_requests() <= 3,
        "{} token requests",
        w.sim.token_requests()
    );
}

async fn both_queues_drain_at_once(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let rebills: Vec<String> = (0..200).map(|i| format!("BOTH-R-{i}")).collect();
    w.writer.insert_rebills(&rebills, TAX).await;
    for i in 0..200 {
        w.writer
            .execute(
                "INSERT INTO title_submissions (order_no, invoice_type, attach, gmf_mc, data_type) VALUES ($1, '1', 'A1', $2, $3)",
                &[Arg::Text(format!("BOTH-T-{i}")), Arg::Text(format!("公司{i}")), Arg::Int(i % 2)],
            )
            .await;
    }
    w.sim.script_rebill(
        "BOTH-R-7",
        vec![RebillBehavior::Status(500), RebillBehavior::Accepted],
    );
    let daemon = w.start().await;
    wait_until(Duration::from_secs(30), "both queues drained", || async {
        w.count("SELECT (SELECT COUNT(*) FROM rebill_orders WHERE status = 'done') + (SELECT COUNT(*) FROM title_submissions WHERE status = 'done')").await == 400
    })
    .await;
    daemon.stop().await;
    assert_eq!(w.sim.title_requests().len(), 200);
    assert_eq!(w.sim.rebill_requests().len(), 201);
    let serials: std::collections::HashSet<String> = w.sim.accepted_serials().into_iter().collect();
    assert_eq!(serials.len(), 200, "every generated serial is unique");
}
