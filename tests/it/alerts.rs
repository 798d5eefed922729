//! Alerts end to end: state changes raise outbox rows in their own transaction, the
//! deliverer posts them to the simulated group-chat robots (which check DingTalk's and
//! Feishu's signatures), retries refusals, survives kill -9, and the monitors send digests
//! and stuck / recovered notices once.

use std::time::Duration;

use crate::common::{binary, config_toml, wait_until, Arg, Backend, Daemon, World, TAX};
use invoice_worker::config::{AlertKind, AlertTargetConfig};
use invoice_worker::secret::Secret;
use invoice_worker::sim::{RebillBehavior, RobotBehavior, RobotMessage, SimOptions};
use invoice_worker::store::driver::{AlertStore as _, QueueStore as _};
use invoice_worker::store::QueueName;

const SMS: &str = "本次操作需登录电子发票服务平台,请先使用短信验证码登录";

fn target(kind: AlertKind, name: &str, url: String, secret: Option<&str>) -> AlertTargetConfig {
    AlertTargetConfig {
        kind,
        name: Some(name.to_string()),
        url: Some(Secret::new(url)),
        url_file: None,
        secret: secret.map(Secret::new),
        secret_file: None,
        events: None,
        rate_per_minute: 600,
        allow_insecure_http: false,
    }
}

/// A world on `backend` alerting through one WeCom robot keyed `key`, retrying after
/// 100 ms (`None`: no PostgreSQL here).
async fn alerting_world(backend: Backend, key: &str) -> Option<World> {
    let mut w = World::on(backend).await?;
    w.config.alert = vec![target(AlertKind::Wecom, "ops", w.sim.wecom_url(key), None)];
    w.config.alerting.retry_delay = Duration::from_millis(100);
    w.config.validate().expect("valid");
    Some(w)
}

fn sms_rows(w: &World, orders: &[&str]) {
    for order in orders {
        w.sim.script_rebill(
            order,
            vec![RebillBehavior::Fail {
                code: 1,
                message: SMS.to_string(),
            }],
        );
    }
}

fn messages_for(w: &World, key: &str) -> Vec<RobotMessage> {
    w.sim
        .robot_messages()
        .into_iter()
        .filter(|m| m.key == key)
        .collect()
}

fn delivered(w: &World, key: &str) -> Vec<RobotMessage> {
    messages_for(w, key)
        .into_iter()
        .filter(|m| m.answered == "Ok")
        .collect()
}

on_both_backends!(
    one_pause_is_one_alert_per_target_and_its_lift_another,
    a_refusing_robot_is_retried_until_it_takes_the_alert,
    failed_rows_come_as_one_digest_not_one_alert_each,
    a_queue_that_stops_moving_is_reported_and_so_is_its_recovery,
    an_undelivered_alert_survives_kill_9_and_is_delivered_once,
    alert_test_reaches_every_target_and_reports_refusals,
    a_queue_paused_by_refused_credentials_is_one_alert,
);

async fn outbox(w: &World) -> Vec<(String, String)> {
    w.writer
        .rows("SELECT event, status FROM alert_outbox ORDER BY id", &[])
        .await
}

async fn one_pause_is_one_alert_per_target_and_its_lift_another(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    let secret = SimOptions::default().robot_secret;
    w.sim.require_robot_signature(true);
    let mut webhook = target(
        AlertKind::Webhook,
        "hook",
        w.sim.webhook_url("hook"),
        Some(&secret),
    );
    webhook.events = Some(vec![invoice_worker::alerts::EventKind::SellerPaused]);
    w.config.alert = vec![
        target(AlertKind::Wecom, "wecom", w.sim.wecom_url("wk"), None),
        target(
            AlertKind::Dingtalk,
            "ding",
            w.sim.dingtalk_url("dk"),
            Some(&secret),
        ),
        target(
            AlertKind::Feishu,
            "fei",
            w.sim.feishu_url("fk"),
            Some(&secret),
        ),
        webhook,
    ];
    w.config.validate().expect("valid");
    let orders = ["A-1", "A-2", "A-3", "A-4", "A-5"];
    sms_rows(&w, &orders);
    for order in orders {
        w.insert_rebill(order, TAX).await;
    }
    let daemon = w.start().await;
    wait_until(
        Duration::from_secs(10),
        "the pause alert at every target",
        || async {
            ["wk", "dk", "fk", "hook"]
                .iter()
                .all(|k| !delivered(&w, k).is_empty())
        },
    )
    .await;
    // Every row of the seller met the pause (or its answer extended it): still one alert.
    wait_until(
        Duration::from_secs(10),
        "the seller's rows to be held",
        || async {
            w.count("SELECT COUNT(*) FROM rebill_orders WHERE status = 'running'")
                .await
                == 0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for key in ["wk", "dk", "fk", "hook"] {
        let got = messages_for(&w, key);
        assert_eq!(got.len(), 1, "{key}: {got:#?}");
        let m = &got[0];
        assert!(m.signed || key == "wk", "{key} unsigned: {m:?}");
        assert!(m.text.contains(TAX), "{key}: {}", m.text);
        assert!(
            m.text.contains(&format!("invoice-worker resume {TAX}")),
            "{key}: {}",
            m.text
        );
        assert!(
            m.text.contains("短信验证码"),
            "{key}: the platform's message: {}",
            m.text
        );
        // Chinese first, English after.
        let zh = m.text.find("已暂停").expect("Chinese text");
        let en = m.text.find("is paused").expect("English text");
        assert!(zh < en, "{key}: {}", m.text);
    }
    let hook = &messages_for(&w, "hook")[0];
    assert_eq!(hook.body["event"], "seller_paused");
    assert_eq!(hook.body["scope"], TAX);
    assert_eq!(hook.body["queue"], "rebill");

    // The seller logged in and the operator lifts the pause: one more alert to each
    // target that wants it, and the held rows go out.
    for order in orders {
        w.sim.script_rebill(order, vec![RebillBehavior::Accepted]);
    }
    let operator = w.database.clone().with_alerts(true);
    assert!(operator
        .resume(QueueName::Rebill, TAX, invoice_worker::store::now_ms())
        .await
        .expect("resume"));
    wait_until(Duration::from_secs(10), "the lift alert", || async {
        ["wk", "dk", "fk"]
            .iter()
            .all(|k| delivered(&w, k).len() >= 2)
    })
    .await;
    w.wait_finished("rebill_orders", &[1, 2, 3, 4, 5]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.stop().await;
    for key in ["wk", "dk", "fk"] {
        assert_eq!(messages_for(&w, key).len(), 2, "{key}");
    }
    for key in ["wk", "dk", "fk"] {
        let lifted = &delivered(&w, key)[1];
        assert!(
            lifted.text.contains("resumed by an operator"),
            "{key}: {}",
            lifted.text
        );
    }
    assert_eq!(
        messages_for(&w, "hook").len(),
        1,
        "the webhook asked for seller_paused only"
    );
    let events: Vec<String> = outbox(&w).await.into_iter().map(|(e, _)| e).collect();
    assert_eq!(events, ["seller_paused", "pause_lifted"]);
}

async fn a_refusing_robot_is_retried_until_it_takes_the_alert(backend: Backend) {
    let Some(w) = alerting_world(backend, "retry-key").await else {
        return;
    };
    w.sim.script_robot(
        "retry-key",
        vec![
            RobotBehavior::Refuse {
                code: 45009,
                message: "api freq out of limit".into(),
            },
            RobotBehavior::Status(502),
            RobotBehavior::Ok,
        ],
    );
    sms_rows(&w, &["R-1"]);
    w.insert_rebill("R-1", TAX).await;
    let daemon = w.start().await;
    wait_until(Duration::from_secs(10), "the third post", || async {
        !delivered(&w, "retry-key").is_empty()
    })
    .await;
    daemon.stop().await;
    let got = messages_for(&w, "retry-key");
    let answers: Vec<&str> = got.iter().map(|m| m.answered).collect();
    assert_eq!(answers, ["Refuse", "Status", "Ok"]);
    assert_eq!(
        outbox(&w).await,
        [("seller_paused".to_string(), "delivered".to_string())]
    );
    let report = w
        .database
        .alert_report(invoice_worker::store::now_ms())
        .await
        .expect("report");
    assert_eq!((report.pending, report.given_up), (0, 0));
    let ops = &report.targets[0];
    assert_eq!(ops.name, "ops");
    assert!(
        ops.failing_since.is_none() && ops.last_ok_at.is_some(),
        "{ops:?}"
    );
}

async fn failed_rows_come_as_one_digest_not_one_alert_each(backend: Backend) {
    let Some(mut w) = alerting_world(backend, "digest-key").await else {
        return;
    };
    // The monitor's first look starts the window (what failed before it is not news). The
    // rows go in once it has looked, so all three fail inside that window and make one
    // digest. (Inserted before the start, a row could fail before the first look: the
    // workers and the monitor start together.)
    w.config.alerting.digest_every = Duration::from_secs(3);
    let daemon = w.start().await;
    wait_until(
        Duration::from_secs(10),
        "the monitor's first look",
        || async {
            w.count("SELECT COUNT(*) FROM alert_state WHERE key = 'rows_failed:rebill'")
                .await
                == 1
        },
    )
    .await;
    let orders = ["F-1", "F-2", "F-3"];
    for order in orders {
        w.sim
            .script_rebill(order, vec![RebillBehavior::Status(500)]);
        w.writer
            .execute(
                "INSERT INTO rebill_orders (orderno, tax_num, max_attempts) VALUES ($1, $2, 1)",
                &[Arg::text(order), Arg::text(TAX)],
            )
            .await;
    }
    wait_until(Duration::from_secs(10), "the digest", || async {
        !delivered(&w, "digest-key").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.stop().await;
    let got = delivered(&w, "digest-key");
    assert_eq!(got.len(), 1, "{got:#?}");
    let text = &got[0].text;
    assert!(text.contains('3'), "{text}");
    for order in orders {
        assert!(text.contains(order), "{order} named: {text}");
    }
    assert!(text.contains("invoice-worker retry"), "{text}");
}

async fn a_queue_that_stops_moving_is_reported_and_so_is_its_recovery(backend: Backend) {
    let Some(mut w) = alerting_world(backend, "stuck-key").await else {
        return;
    };
    w.config.alerting.stuck_after = Duration::from_secs(1);
    w.config.rebill.limits.max_in_flight = 1;
    for order in ["S-1", "S-2", "S-3"] {
        w.sim.script_rebill(
            order,
            vec![RebillBehavior::Delay(Duration::from_millis(1200))],
        );
        w.insert_rebill(order, TAX).await;
    }
    let daemon = w.start().await;
    wait_until(Duration::from_secs(20), "stuck and recovered", || async {
        delivered(&w, "stuck-key").len() >= 2
    })
    .await;
    daemon.stop().await;
    let events: Vec<String> = outbox(&w).await.into_iter().map(|(e, _)| e).collect();
    assert_eq!(events, ["queue_stuck", "queue_recovered"]);
    let got = delivered(&w, "stuck-key");
    assert!(
        got[0].text.contains("invoice-worker status"),
        "{}",
        got[0].text
    );
}

/// The alert outlives a daemon killed while its robot answers 404: the next daemon
/// delivers it once the robot works again. Meanwhile the failing target is in the log and
/// in `status`, and the robot's key (the secret in its URL) in neither.
async fn an_undelivered_alert_survives_kill_9_and_is_delivered_once(backend: Backend) {
    let key = "ROBOTKEY-5ac1d2e3f4b5";
    let Some(w) = World::on(backend).await else {
        return;
    };
    w.sim.script_robot(key, vec![RobotBehavior::Status(404)]);
    sms_rows(&w, &["K-1"]);
    w.insert_rebill("K-1", TAX).await;
    let config = w.dir().join("alerting.toml");
    let text = format!(
        "{}\n[alerting]\nretry_delay = \"100ms\"\nreport_failing_after = \"1s\"\n\n[[alert]]\nkind = \"wecom\"\nname = \"ops\"\nurl = \"{}\"\n",
        config_toml(&w.config, &SimOptions::default()),
        w.sim.wecom_url(key)
    );
    std::fs::write(&config, text).expect("config");

    let mut first = Daemon::start(&config, w.dir().join("first.log"));
    first
        .wait_for_log("alert target keeps failing", Duration::from_secs(15))
        .await;
    let status = binary()
        .args(["--config", config.to_str().expect("utf-8"), "status"])
        .output()
        .expect("status");
    let shown = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(shown.contains("alert target ops: FAILING for"), "{shown}");
    assert!(shown.contains("404"), "{shown}");
    first.kill_9("with the alert undelivered");
    assert!(delivered(&w, key).is_empty());
    let log = first.log_text();
    assert!(!log.contains(key), "robot key in the log:\n{log}");
    assert!(!shown.contains(key), "robot key in status:\n{shown}");

    w.sim.script_robot(key, vec![RobotBehavior::Ok]);
    let mut second = Daemon::start(&config, w.dir().join("second.log"));
    wait_until(
        Duration::from_secs(15),
        "delivery after the restart",
        || async { !delivered(&w, key).is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = second.stop(Duration::from_secs(10), "after delivery");
    assert!(!log.contains(key), "robot key in the log:\n{log}");
    assert_eq!(delivered(&w, key).len(), 1);
    assert_eq!(
        outbox(&w).await,
        [("seller_paused".to_string(), "delivered".to_string())]
    );
}

/// `alert test` posts one message to every target at once, outside the outbox, and says
/// which took it; a refusal makes it exit 1.
async fn alert_test_reaches_every_target_and_reports_refusals(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let secret = SimOptions::default().robot_secret;
    w.sim.require_robot_signature(true);
    w.sim.script_robot(
        "refusing",
        vec![RobotBehavior::Refuse {
            code: 93000,
            message: "invalid webhook url".into(),
        }],
    );
    let config = w.dir().join("alert-test.toml");
    let entries = |wecom_key: &str| {
        format!(
            "[database]\npath = \"{}\"\n\n[[alert]]\nkind = \"dingtalk\"\nname = \"ding\"\nurl = \"{}\"\nsecret = \"{secret}\"\n\n\
             [[alert]]\nkind = \"feishu\"\nname = \"fei\"\nsecret = \"{secret}\"\n\n\
             [[alert]]\nkind = \"wecom\"\nname = \"wc\"\nurl = \"{}\"\n",
            w.dir().join("unused.db").display(),
            w.sim.dingtalk_url("ding-token"),
            w.sim.wecom_url(wecom_key),
        )
    };
    for (key, code) in [("working", 0), ("refusing", 1)] {
        std::fs::write(&config, entries(key)).expect("config");
        // Feishu's URL from the environment variable named after its target.
        let out = binary()
            .args(["--config", config.to_str().expect("utf-8"), "alert", "test"])
            .env(
                "INVOICE_WORKER_ALERT_FEI_URL",
                w.sim.feishu_url("fei-token"),
            )
            .output()
            .expect("alert test");
        let shown = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(out.status.code(), Some(code), "{shown}");
        assert!(
            shown.contains("ding: delivered") && shown.contains("fei: delivered"),
            "{shown}"
        );
        let wecom = if code == 0 {
            "wc: delivered"
        } else {
            "wc: FAILED"
        };
        assert!(shown.contains(wecom), "{shown}");
    }
    let signed: Vec<bool> = w
        .sim
        .robot_messages()
        .iter()
        .filter(|m| m.kind != "wecom")
        .map(|m| m.signed)
        .collect();
    assert_eq!(signed, [true, true, true, true]);
    assert!(w
        .sim
        .robot_messages()
        .iter()
        .all(|m| m.text.contains("alert test")));
}

/// Refused credentials stop the whole queue: one alert naming the command that resumes it.
async fn a_queue_paused_by_refused_credentials_is_one_alert(backend: Backend) {
    let Some(mut w) = alerting_world(backend, "queue-key").await else {
        return;
    };
    w.config.rebill.app_secret = Some(Secret::new("not-the-gateway-secret"));
    for order in ["Q-1", "Q-2", "Q-3"] {
        w.insert_rebill(order, TAX).await;
    }
    let daemon = w.start().await;
    wait_until(Duration::from_secs(10), "the queue pause alert", || async {
        !delivered(&w, "queue-key").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.stop().await;
    let got = delivered(&w, "queue-key");
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0]
            .text
            .contains("invoice-worker resume --queue rebill '*'"),
        "{}",
        got[0].text
    );
    assert!(
        !got[0].text.contains("not-the-gateway-secret"),
        "{}",
        got[0].text
    );
    let events: Vec<String> = outbox(&w).await.into_iter().map(|(e, _)| e).collect();
    assert_eq!(events, ["queue_paused"]);
}
