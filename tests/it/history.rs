//! The attempt history end to end: the daemon records each attempt against the simulated
//! gateway, and the real binary's `show` prints the row with every column and its attempts.

use std::process::Output;

use crate::common::{binary, Arg, Backend, World, TAX};
use invoice_worker::sim::RebillBehavior;

fn show(config: &std::path::Path, args: &[&str]) -> Output {
    binary()
        .arg("show")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run show")
}

on_both_backends!(
    show_prints_every_attempt_the_daemon_made,
    show_masks_the_buyers_phone_and_account_and_shows_hostile_text_as_text,
);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn show_prints_every_attempt_the_daemon_made(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    w.sim.script_rebill(
        "HIST-1",
        vec![
            RebillBehavior::Status(500),
            RebillBehavior::Fail {
                code: 9,
                message: "系统繁忙".to_string(),
            },
            RebillBehavior::Accepted,
        ],
    );
    let id = w.insert_rebill("HIST-1", TAX).await;
    let daemon = w.start().await;
    w.wait_finished("rebill_orders", &[id]).await;
    daemon.stop().await;
    let config = w.write_config();

    let out = show(&config, &["--json", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let detail: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(detail["queue"], "rebill");
    assert_eq!(detail["columns"]["orderno"], "HIST-1");
    assert_eq!(detail["columns"]["status"], "done");
    let history = detail["history"].as_array().expect("history");
    let seen: Vec<(i64, &str, i64, &str)> = history
        .iter()
        .map(|h| {
            (
                h["attempt"].as_i64().unwrap_or(-9),
                h["action"].as_str().unwrap_or("?"),
                h["http_status"].as_i64().unwrap_or(-9),
                h["status"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, "retry", 500, "pending"),
            (2, "retry", 200, "pending"),
            (3, "done", 200, "done"),
        ],
        "{history:#?}"
    );
    assert_eq!(history[1]["code"], "9");
    assert!(history[1]["message"]
        .as_str()
        .unwrap_or("")
        .contains("系统繁忙"));
    for h in history {
        assert!(h["duration_ms"].as_i64().is_some_and(|ms| ms >= 0), "{h}");
        assert!(h["instance"].as_str().is_some_and(|i| !i.is_empty()), "{h}");
    }

    let out = show(&config, &[&id.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(printed.contains(&format!("rebill row {id}")), "{printed}");
    assert!(printed.contains("attempts (3):"), "{printed}");
    assert!(printed.contains("系统繁忙"), "{printed}");

    let out = show(&config, &["999999"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no row 999999 in the rebill queue"));
}

async fn show_masks_the_buyers_phone_and_account_and_shows_hostile_text_as_text(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let id = w
        .writer
        .insert_id(
            "INSERT INTO title_submissions (order_no, invoice_type, attach, gmf_mc, gmf_dh, gmf_yhzh) \
             VALUES ('T-SHOW', '1', 'A1', $1, '13800138000', '招商银行 6225880112345678') RETURNING id",
            &[Arg::text("<script>alert(1)</script>\u{202E}evil")],
        )
        .await;
    let config = w.write_config();
    let out = show(&config, &["--queue", "title", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(printed.contains("****8000"), "{printed}");
    assert!(!printed.contains("13800138000"), "{printed}");
    assert!(printed.contains("****5678"), "{printed}");
    assert!(!printed.contains("6225880112345678"), "{printed}");
    // The right-to-left override is shown escaped, never applied to the terminal.
    assert!(!printed.contains('\u{202E}'), "{printed}");
    assert!(printed.contains("<script>alert(1)</script>"), "{printed}");
    assert!(printed.contains("attempts: none recorded"), "{printed}");
}
