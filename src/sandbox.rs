//! `invoice-worker sandbox`: the whole product with no credentials and no network. It
//! starts the simulated servers on 127.0.0.1, seeds a fresh database with rows that reach
//! every outcome, runs the real daemon code until the queues drain and prints every row.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cli::CliError;
use crate::config::{Config, DataType};
use crate::sim::{RebillBehavior, SimOptions, Simulator, TitleBehavior};
use crate::store::admin::{NewRebill, NewTitle};
use crate::store::database::Location;
use crate::store::driver::QueueStore as _;
use crate::store::{now_ms, Database, QueueName, StoreError};
use crate::title_fields::TitleFields;

/// Longest the sandbox waits for the queues to drain.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);

const SELLER: &str = "91310117568051222X";
const SMS_SELLER: &str = "91440300715267260A";

/// Runs the sandbox and prints the final table: on a SQLite file of its own, or on the
/// PostgreSQL database at `database_url`, whose queue tables must be empty (the demo's
/// table shows every row, and it must not mix its rows with anyone's).
pub async fn run(database_url: Option<&str>) -> Result<(), CliError> {
    let sim = Simulator::start(SimOptions::default())
        .await
        .context("starting the simulated servers")?;
    let dir = std::env::temp_dir().join(format!("invoice-worker-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut config = sandbox_config(&sim, &dir)?;
    if let Some(url) = database_url {
        config.database.url = Some(url.to_string());
        config.validate()?;
    }
    crate::telemetry::init(&config.log);
    let location = config.database.location()?;
    if let Location::Sqlite { path, .. } = &location {
        let _ = std::fs::remove_file(path);
    }
    let store = Database::open(&location)
        .await
        .map_err(|e| crate::cli::opening(&location, e))?
        .with_alerts(true);
    if !empty(&store).await? {
        return Err(CliError::Usage(format!(
            "sandbox: the queue tables of {} are not empty; the sandbox needs a database of its own (createdb invoice_worker_sandbox)",
            store.describe()
        )));
    }
    let result = demo(&sim, &config, &store).await;
    store.close().await;
    sim.shutdown();
    result.map_err(CliError::Runtime)
}

/// Whether neither queue table holds a row.
async fn empty(store: &Database) -> Result<bool, StoreError> {
    for queue in QueueName::ALL {
        if !store.list(queue, None, 1).await?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn demo(sim: &Simulator, config: &Config, store: &Database) -> anyhow::Result<()> {
    seed(store, sim).await?;
    println!(
        "sandbox: simulated servers on {}, {} database {}",
        sim.addr(),
        store.backend(),
        store.describe()
    );

    let shutdown = CancellationToken::new();
    let daemon = {
        let (mut config, store, shutdown) = (config.clone(), store.clone(), shutdown.clone());
        // Already opened: the daemon must not look at `url` again.
        config.database.url = None;
        tokio::spawn(async move { crate::daemon::run_with_store(&config, store, shutdown).await })
    };
    let started = std::time::Instant::now();
    while !drained(store).await? {
        if started.elapsed() > DRAIN_LIMIT {
            shutdown.cancel();
            anyhow::bail!("sandbox queues did not drain within {DRAIN_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The SMS-login seller's pause raised an alert: wait for the robot to have it.
    while sim.robot_messages().iter().all(|m| m.answered != "Ok") {
        if started.elapsed() > DRAIN_LIMIT {
            shutdown.cancel();
            anyhow::bail!("the sandbox's alert did not reach the simulated robot");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    daemon.await.context("daemon task")??;

    println!();
    for queue in QueueName::ALL {
        println!("== {} ==", queue.table());
        print!(
            "{}",
            crate::report::rows_table(queue, &store.list(queue, None, 1000).await?)
        );
        println!();
    }
    crate::report::print_status(store, false, Some(&config.alerting)).await?;
    for message in sim.robot_messages().iter().filter(|m| m.answered == "Ok") {
        println!();
        println!(
            "== alert received by the simulated {} robot ==",
            message.kind
        );
        println!("{}", message.text);
    }
    println!(
        "simulator saw {} rebill requests, {} title submissions, {} token requests; drained in {:.1}s",
        sim.rebill_requests().len(),
        sim.title_requests().len(),
        sim.token_requests(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn sandbox_config(sim: &Simulator, dir: &std::path::Path) -> anyhow::Result<Config> {
    let mut c = crate::sim::config_for(sim, &SimOptions::default(), &dir.join("sandbox.db"));
    c.retry.base_delay = Duration::from_millis(200);
    c.retry.max_delay = Duration::from_secs(1);
    c.worker.lease = Duration::from_secs(10);
    c.rebill.limits.timeout = Duration::from_secs(2);
    c.title.sqm = Some("SANDBOX-SQM".to_string());
    c.title.ttqqlsh_prefix = "SBX".to_string();
    c.title.data_type = DataType::Json;
    c.title.limits.timeout = Duration::from_secs(2);
    c.alert = vec![crate::config::AlertTargetConfig {
        kind: crate::config::AlertKind::Wecom,
        name: Some("sandbox-wecom".to_string()),
        url: Some(crate::secret::Secret::new(
            sim.wecom_url("sandbox-robot-key"),
        )),
        url_file: None,
        secret: None,
        secret_file: None,
        events: None,
        rate_per_minute: 20,
        allow_insecure_http: false,
    }];
    c.validate()?;
    Ok(c)
}

async fn seed(store: &Database, sim: &Simulator) -> anyhow::Result<()> {
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
    let now = now_ms();
    for (orderno, tax_num, script) in rebill {
        if !script.is_empty() {
            sim.script_rebill(orderno, script);
        }
        // The SMS seller's second row comes after the first, so the first trips the pause.
        let not_before = (orderno == "SBX-SMS-SAME-SELLER").then_some(now + 500);
        store
            .enqueue_rebill(
                &NewRebill {
                    orderno: orderno.to_string(),
                    tax_num: tax_num.to_string(),
                    max_attempts: None,
                    not_before,
                },
                now,
            )
            .await?;
    }

    let title = |order_no: &str, invoice_type: &str, gmf_mc: &str, data_type: u8| NewTitle {
        fields: TitleFields {
            order_no: order_no.to_string(),
            invoice_type: invoice_type.to_string(),
            attach: "661234567890".to_string(),
            gmf_mc: gmf_mc.to_string(),
            gmf_dh: Some("13800138000".to_string()),
            gmf_yhzh: Some("招商银行 6225880123456789".to_string()),
            ..TitleFields::default()
        },
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
    special.fields.gmf_nsrsbh = Some("9144030071526726XG".to_string());
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
    invalid.fields.gmf_nsrsbh = None;
    store.enqueue_title(&invalid).await?;
    let mut bad_uscc = title("SBX-T-BAD-USCC", "1", "校验位错误公司", 1);
    bad_uscc.fields.gmf_nsrsbh = Some("91110000600037341N".to_string());
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
async fn drained(store: &Database) -> anyhow::Result<bool> {
    let now = now_ms();
    let pauses = store.pauses(now).await?;
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
