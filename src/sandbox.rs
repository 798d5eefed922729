//! `invoice-worker sandbox`: the whole product with no credentials and no network. It
//! starts the simulated servers on 127.0.0.1, seeds a fresh database with rows that reach
//! every outcome, runs the real daemon code until the queues drain and prints every row.
//! Also home of the tables `status` and `list` print.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DataType};
use crate::secret::Secret;
use crate::sim::{RebillBehavior, SimOptions, Simulator, TitleBehavior};
use crate::store::admin::{NewRebill, NewTitle, RowSummary};
use crate::store::{now_ms, QueueName, Store};

/// Longest the sandbox waits for the queues to drain.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);

const SELLER: &str = "91310117568051222X";
const SMS_SELLER: &str = "91440300715267260A";

/// Runs the sandbox and prints the final table.
pub async fn run() -> anyhow::Result<()> {
    let sim = Simulator::start(SimOptions::default())
        .await
        .context("starting the simulated servers")?;
    let dir = std::env::temp_dir().join(format!("invoice-worker-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = sandbox_config(&sim, &dir)?;
    crate::telemetry::init(&config.log);
    let _ = std::fs::remove_file(&config.database.path);
    let store =
        Store::open_and_migrate(&config.database.path, config.database.busy_timeout).await?;
    seed(&store, &sim).await?;
    println!(
        "sandbox: simulated servers on {}, database {}",
        sim.addr(),
        config.database.path.display()
    );

    let shutdown = CancellationToken::new();
    let daemon = {
        let (config, store, shutdown) = (config.clone(), store.clone(), shutdown.clone());
        tokio::spawn(async move { crate::daemon::run_with_store(&config, store, shutdown).await })
    };
    let started = std::time::Instant::now();
    while !drained(&store).await? {
        if started.elapsed() > DRAIN_LIMIT {
            shutdown.cancel();
            anyhow::bail!("sandbox queues did not drain within {DRAIN_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    daemon.await.context("daemon task")??;
    sim.shutdown();

    println!();
    for queue in QueueName::ALL {
        println!("== {} ==", queue.table());
        print!(
            "{}",
            rows_table(queue, &store.list(queue, None, 1000).await?)
        );
        println!();
    }
    print_status(&store, false).await?;
    println!(
        "simulator saw {} rebill requests, {} title submissions, {} token requests; drained in {:.1}s",
        sim.rebill_requests().len(),
        sim.title_requests().len(),
        sim.token_requests(),
        started.elapsed().as_secs_f64()
    );
    store.close().await;
    Ok(())
}

fn sandbox_config(sim: &Simulator, dir: &std::path::Path) -> anyhow::Result<Config> {
    let defaults = SimOptions::default();
    let mut c = Config::default();
    c.database.path = dir.join("sandbox.db");
    c.retry.base_delay = Duration::from_millis(200);
    c.retry.max_delay = Duration::from_secs(1);
    c.worker.lease = Duration::from_secs(10);
    c.housekeeping.enabled = false;
    c.rebill.endpoint = sim.rebill_url();
    c.rebill.appid = Some(defaults.rebill_appid);
    c.rebill.app_secret = Some(Secret::new(defaults.rebill_secret));
    c.rebill.limits.timeout = Duration::from_secs(2);
    c.title.base_url = Some(sim.title_base_url());
    c.title.client_id = Some(defaults.title_client_id);
    c.title.client_secret = Some(Secret::new(defaults.title_client_secret));
    c.title.sqm = Some("SANDBOX-SQM".to_string());
    c.title.ttqqlsh_prefix = "SBX".to_string();
    c.title.data_type = DataType::Json;
    c.title.limits.timeout = Duration::from_secs(2);
    c.validate()?;
    Ok(c)
}

async fn seed(store: &Store, sim: &Simulator) -> anyhow::Result<()> {
    let sms = "本次操作需登录电子发票服务平台,请先使用短信验证码登录";
    let rebill: Vec<(&str, &str, Vec<RebillBehavior>)> = vec![
        ("SBX-ACCEPTED", SELLER, vec![RebillBehavior::Accepted]),
        ("SBX-ISSUED", SELLER, vec![RebillBehavior::Issued]),
        (
            "SBX-IN-PROGRESS",
            SELLER,
            vec![fail(1, "开票中(重试中),请耐心等待开票结果")],
        ),
        (
            "SBX-ALREADY-GENERATED",
            SELLER,
            vec![fail(1, "发票已生成,无需再重试开票")],
        ),
        ("SBX-NEEDS-SMS-LOGIN", SMS_SELLER, vec![fail(1, sms)]),
        (
            "SBX-SMS-SAME-SELLER",
            SMS_SELLER,
            vec![RebillBehavior::Accepted],
        ),
        (
            "SBX-FLAKY-THEN-OK",
            SELLER,
            vec![
                RebillBehavior::Status(502),
                RebillBehavior::Html,
                RebillBehavior::Garbage,
                RebillBehavior::Accepted,
            ],
        ),
        (
            "SBX-CODE-AS-STRING",
            SELLER,
            vec![RebillBehavior::CodeAsString],
        ),
        ("SBX BAD ORDERNO", SELLER, vec![]),
        ("SBX-BAD-TAX-NUM", "1234", vec![]),
    ];
    for (orderno, tax_num, script) in rebill {
        if !script.is_empty() {
            sim.script_rebill(orderno, script);
        }
        store
            .enqueue_rebill(&NewRebill {
                orderno: orderno.to_string(),
                tax_num: tax_num.to_string(),
                max_attempts: None,
            })
            .await?;
    }
    // The SMS seller's second row must come after the first so the first one trips the pause.
    sqlx::query("UPDATE rebill_orders SET next_attempt_at = next_attempt_at + 500 WHERE orderno = 'SBX-SMS-SAME-SELLER'")
        .execute(store.pool())
        .await?;

    let title = |order_no: &str, invoice_type: &str, gmf_mc: &str, data_type: u8| NewTitle {
        order_no: order_no.to_string(),
        invoice_type: invoice_type.to_string(),
        attach: "661234567890".to_string(),
        gmf_mc: gmf_mc.to_string(),
        gmf_dh: Some("13800138000".to_string()),
        gmf_yhzh: Some("招商银行 6225880123456789".to_string()),
        data_type: Some(data_type),
        ..NewTitle::default()
    };
    store
        .enqueue_title(&title("SBX-T-JSON", "1", "上海某某科技有限公司", 0))
        .await?;
    store
        .enqueue_title(&title("SBX-T-XML", "1", "北京某某餐饮有限公司", 1))
        .await?;
    store
        .enqueue_title(&title(
            "SBX-T-ESCAPES",
            "1",
            "A&B <贸易> \"引号\" 'x' 公司",
            1,
        ))
        .await?;
    let mut special = title("SBX-T-SPECIAL", "2", "深圳某某电子有限公司", 0);
    special.gmf_nsrsbh = Some("9144030071526726XG".to_string());
    store.enqueue_title(&special).await?;
    sim.script_title(
        "SBX-T-TOKEN-EXPIRED",
        vec![TitleBehavior::TokenExpired, TitleBehavior::Ok],
    );
    store
        .enqueue_title(&title(
            "SBX-T-TOKEN-EXPIRED",
            "1",
            "杭州某某网络有限公司",
            0,
        ))
        .await?;
    let mut invalid = title("SBX-T-INVALID", "2", "缺少税号的专票抬头", 0);
    invalid.gmf_nsrsbh = None;
    store.enqueue_title(&invalid).await?;
    let mut bad_uscc = title("SBX-T-BAD-USCC", "1", "校验位错误公司", 1);
    bad_uscc.gmf_nsrsbh = Some("91110000600037341N".to_string());
    store.enqueue_title(&bad_uscc).await?;
    Ok(())
}

fn fail(code: i64, message: &str) -> RebillBehavior {
    RebillBehavior::Fail {
        code,
        message: message.to_string(),
    }
}

/// True when nothing is running and every pending row waits behind a pause.
async fn drained(store: &Store) -> anyhow::Result<bool> {
    let now = now_ms();
    let pauses = store.pauses().await?;
    for queue in QueueName::ALL {
        let counts = store.counts(queue, now).await?;
        if counts.count("running") > 0 {
            return Ok(false);
        }
        let paused = |seller: &str| {
            pauses
                .iter()
                .any(|p| p.queue == queue.as_str() && (p.scope == seller || p.scope == "*"))
        };
        for row in store.list(queue, Some("pending"), 10_000).await? {
            let seller = row.key.clone().unwrap_or_default();
            let held = match queue {
                QueueName::Rebill => paused(&seller),
                QueueName::Title => paused(crate::store::rows::DEFAULT_SELLER),
            };
            if !held {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn clip(text: &str, width: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= width {
        flat
    } else {
        let mut out: String = flat.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The rows as a plain-text table.
pub fn rows_table(queue: QueueName, rows: &[RowSummary]) -> String {
    let key = match queue {
        QueueName::Rebill => "tax_num",
        QueueName::Title => "ttqqlsh",
    };
    let mut out = format!(
        "{:>5}  {:<22} {:<20} {:<9} {:<11} {:>3}  {:<6} {:<22} {}\n",
        "id", "order", key, "status", "outcome", "att", "code", "invoice_no", "last_message"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>5}  {:<22} {:<20} {:<9} {:<11} {:>3}  {:<6} {:<22} {}\n",
            r.id,
            clip(&r.order, 22),
            clip(r.key.as_deref().unwrap_or("-"), 20),
            r.status,
            r.outcome.as_deref().unwrap_or("-"),
            r.attempts,
            clip(r.last_code.as_deref().unwrap_or("-"), 6),
            r.invoice_no.as_deref().unwrap_or("-"),
            clip(r.last_message.as_deref().unwrap_or(""), 70)
        ));
    }
    if rows.is_empty() {
        out.push_str("(no rows)\n");
    }
    out
}

/// Prints per-queue counts, the oldest pending age and pauses (`invoice-worker status`).
pub async fn print_status(store: &Store, json: bool) -> anyhow::Result<()> {
    let now = now_ms();
    let mut counts = Vec::new();
    for queue in QueueName::ALL {
        counts.push(store.counts(queue, now).await?);
    }
    let pauses = store.pauses().await?;
    if json {
        let value = serde_json::json!({ "queues": counts, "pauses": pauses, "now_ms": now });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "{:<7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}  oldest due pending",
        "queue", "pending", "running", "done", "failed", "rejected", "cancelled"
    );
    for c in &counts {
        let age = c
            .oldest_pending_age_ms
            .map(|ms| {
                humantime::format_duration(Duration::from_secs((ms / 1000) as u64)).to_string()
            })
            .unwrap_or_else(|| "-".to_string());
        println!(
            "{:<7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}  {}",
            c.queue,
            c.count("pending"),
            c.count("running"),
            c.count("done"),
            c.count("failed"),
            c.count("rejected"),
            c.count("cancelled"),
            age
        );
    }
    if pauses.is_empty() {
        println!("no pauses");
    }
    for p in pauses {
        let what = if p.scope == "*" {
            "whole queue".to_string()
        } else {
            format!("seller {}", p.scope)
        };
        let when = if p.until_at > now {
            format!(
                "for {}",
                humantime::format_duration(Duration::from_secs(((p.until_at - now) / 1000) as u64))
            )
        } else if p.probe_row_id.is_some() {
            "probing".to_string()
        } else {
            "expired; next row probes".to_string()
        };
        println!("paused: {} {what} {when}: {}", p.queue, clip(&p.reason, 80));
    }
    Ok(())
}
