//! Argument parsing and dispatch to commands; maps failures to exit codes
//! (0 ok, 2 usage or config error, 1 runtime failure).

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::store::admin::{Enqueued, NewRebill, NewTitle};
use crate::store::database::Location;
use crate::store::driver::PauseParams;
use crate::store::driver::{InspectStore as _, QueueStore as _};
use crate::store::pauses::WHOLE_QUEUE;
use crate::store::{now_ms, Database, QueueName, StoreError};
use crate::title_fields::TitleFields;

/// invoice-worker: retries failed e-invoice work (fw199 rebilling, 开票精灵 titles) from a
/// SQLite queue until it succeeds.
#[derive(Debug, Parser)]
#[command(name = "invoice-worker", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "INVOICE_WORKER_CONFIG"
    )]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGTERM/SIGINT.
    Run,
    /// Create or upgrade the database tables, then exit.
    Migrate,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Add a job to a queue.
    #[command(subcommand)]
    Enqueue(Box<EnqueueCommand>),
    /// Row counts per queue and status, oldest pending age, pauses.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List rows, newest first.
    List {
        /// Which queue.
        #[arg(long, default_value = "rebill", value_parser = parse_queue)]
        queue: QueueName,
        /// Only rows with this status.
        #[arg(long, value_parser = ["pending", "running", "done", "failed", "rejected", "cancelled"])]
        status: Option<String>,
        /// Most rows to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one row with every column and its attempt history; exits 1 when there is no
    /// such row.
    Show {
        /// Which queue.
        #[arg(long, default_value = "rebill", value_parser = parse_queue)]
        queue: QueueName,
        /// Row id.
        id: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make failed, rejected or cancelled rows pending again with a fresh attempt budget.
    Retry {
        /// Which queue.
        #[arg(long, default_value = "rebill", value_parser = parse_queue)]
        queue: QueueName,
        /// Every failed row of the queue.
        #[arg(long, conflicts_with = "ids")]
        all_failed: bool,
        /// With --all-failed: only this seller's rows (rebill: tax number; title: sqm).
        #[arg(long, requires = "all_failed")]
        seller: Option<String>,
        /// Row ids.
        #[arg(required_unless_present = "all_failed")]
        ids: Vec<i64>,
    },
    /// Cancel pending rows.
    Cancel {
        /// Which queue.
        #[arg(long, default_value = "rebill", value_parser = parse_queue)]
        queue: QueueName,
        /// Row ids.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Hold a seller's rows (or with '*' the whole queue).
    Pause {
        /// Seller tax number (title queue: the sqm), or '*' for the whole queue.
        tax_num: String,
        /// For how long.
        #[arg(long = "for", default_value = "1h", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Which queue.
        #[arg(long, default_value = "rebill", value_parser = parse_queue)]
        queue: QueueName,
    },
    /// Lift a pause at once.
    Resume {
        /// Seller tax number, or '*' for the whole queue.
        tax_num: String,
        /// Which queue.
        #[arg(long, default_value = "rebill", value_parser = parse_queue)]
        queue: QueueName,
    },
    /// Run the whole thing against simulated servers: no credentials, no network.
    Sandbox {
        /// Run it on this PostgreSQL database (`postgres://user@host/db`; its queue tables
        /// must be empty) instead of a SQLite file of its own. The password may also come
        /// from $INVOICE_WORKER_DATABASE_PASSWORD.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
    },
    /// Alert targets (`[[alert]]`).
    #[command(subcommand)]
    Alert(AlertCommand),
}

/// `alert` subcommands.
#[derive(Debug, Subcommand)]
pub enum AlertCommand {
    /// Send one test message to every target now; exits 1 if any target refused it.
    Test,
}

/// `enqueue` targets.
#[derive(Debug, Subcommand)]
pub enum EnqueueCommand {
    /// A rebilling job (idempotent: an active row for the same order is kept).
    Rebill {
        /// Seller tax number.
        #[arg(long)]
        tax_num: String,
        /// Order number of the original invoicing request.
        #[arg(long)]
        orderno: String,
        /// Attempt limit for this row (default: retry.max_attempts).
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// An invoice-title submission.
    Title(Box<TitleArgs>),
}

/// Fields of `enqueue title`.
#[derive(Debug, Args)]
pub struct TitleArgs {
    /// Read the submission from a JSON file ('-' for stdin) with the protocol's field names
    /// (ORDER_NO, INVOICETYPE, TTQQLSH, ATTACH, GMF_MC, …, SQM, DATATYPE).
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "order_no", "invoice_type", "ttqqlsh", "attach", "gmf_mc", "gmf_nsrsbh", "gmf_dz",
        "gmf_dh", "gmf_yhzh", "gmf_yhmc", "remark", "by1", "by2",
    ])]
    pub json: Option<String>,
    /// ORDER_NO
    #[arg(long, required_unless_present = "json")]
    pub order_no: Option<String>,
    /// INVOICETYPE: 1 普票, 2 专票
    #[arg(long, required_unless_present = "json")]
    pub invoice_type: Option<String>,
    /// TTQQLSH (default: generated)
    #[arg(long)]
    pub ttqqlsh: Option<String>,
    /// ATTACH (usually the tax device number)
    #[arg(long, required_unless_present = "json")]
    pub attach: Option<String>,
    /// GMF_MC: buyer name (the invoice title)
    #[arg(long, required_unless_present = "json")]
    pub gmf_mc: Option<String>,
    /// GMF_NSRSBH: buyer tax id
    #[arg(long)]
    pub gmf_nsrsbh: Option<String>,
    /// GMF_DZ: buyer address
    #[arg(long)]
    pub gmf_dz: Option<String>,
    /// GMF_DH: buyer phone
    #[arg(long)]
    pub gmf_dh: Option<String>,
    /// GMF_YHZH: buyer bank account
    #[arg(long)]
    pub gmf_yhzh: Option<String>,
    /// GMF_YHMC: buyer bank name
    #[arg(long)]
    pub gmf_yhmc: Option<String>,
    /// REMARK
    #[arg(long)]
    pub remark: Option<String>,
    /// BY1
    #[arg(long)]
    pub by1: Option<String>,
    /// BY2
    #[arg(long)]
    pub by2: Option<String>,
    /// 开票精灵 authorisation code (default: title.sqm)
    #[arg(long)]
    pub sqm: Option<String>,
    /// Payload format: json or xml (default: title.data_type)
    #[arg(long, value_parser = ["json", "xml"])]
    pub data_type: Option<String>,
}

fn parse_queue(s: &str) -> Result<QueueName, String> {
    s.parse()
}

/// A failure, sorted by exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or configuration: exit 2.
    #[error("{0}")]
    Usage(String),
    /// Something failed while running: exit 1.
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::Usage(e.to_string())
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Constraint(_) => CliError::Usage(e.to_string()),
            other => CliError::Runtime(other.into()),
        }
    }
}

/// Default config path when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "worker.toml";

/// Parses arguments and runs the command (the binary's whole job).
pub async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Sandbox { database_url } = &cli.command {
        return crate::sandbox::run(database_url.as_deref()).await;
    }
    let explicit = cli.config.is_some();
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = Config::load(&path, explicit)?;
    crate::telemetry::init(&config.log);
    match cli.command {
        Command::Run => run_daemon(&config, &path).await,
        Command::Migrate => {
            let store = open(&config).await?;
            println!("database {} is up to date", store.describe());
            Ok(())
        }
        Command::CheckConfig => check_config(&config, &path),
        Command::Enqueue(what) => enqueue(&open(&config).await?, *what).await,
        Command::Status { json } => {
            let alerting = (!config.alert.is_empty()).then_some(&config.alerting);
            crate::report::print_status(&open(&config).await?, json, alerting)
                .await
                .map_err(CliError::Runtime)
        }
        Command::List {
            queue,
            status,
            limit,
            json,
        } => {
            let rows = open(&config)
                .await?
                .list(queue, status.as_deref(), limit)
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).context("rendering JSON")?
                );
            } else {
                print!("{}", crate::report::rows_table(queue, &rows));
            }
            Ok(())
        }
        Command::Show { queue, id, json } => {
            let Some(detail) = open(&config).await?.show(queue, id).await? else {
                return Err(CliError::Runtime(anyhow::anyhow!(
                    "no row {id} in the {} queue",
                    queue.as_str()
                )));
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&detail).context("rendering JSON")?
                );
            } else {
                print!("{}", crate::report::row_detail_text(&detail));
            }
            Ok(())
        }
        Command::Retry {
            queue,
            all_failed,
            seller,
            ids,
        } => {
            let store = open(&config).await?;
            if let Some(seller) = seller {
                println!(
                    "{} failed {} rows of seller {seller} are pending again",
                    store.retry_failed(queue, Some(&seller)).await?,
                    queue.as_str()
                );
            } else if all_failed {
                println!(
                    "{} failed {} rows are pending again",
                    store.retry_failed(queue, None).await?,
                    queue.as_str()
                );
            } else {
                report_changed("pending again", &ids, &store.retry(queue, &ids).await?);
            }
            Ok(())
        }
        Command::Cancel { queue, ids } => {
            let store = open(&config).await?;
            report_changed("cancelled", &ids, &store.cancel(queue, &ids).await?);
            Ok(())
        }
        Command::Pause {
            tax_num,
            duration,
            queue,
        } => {
            let store = open(&config).await?;
            let until = now_ms() + duration.as_millis() as i64;
            store
                .pause(PauseParams {
                    queue,
                    scope: &tax_num,
                    until,
                    reason: "paused by operator",
                    now: now_ms(),
                })
                .await?;
            let what = if tax_num == WHOLE_QUEUE {
                "whole queue".to_string()
            } else {
                format!("seller {tax_num}")
            };
            println!(
                "{} {what} paused for {}",
                queue.as_str(),
                humantime::format_duration(duration)
            );
            Ok(())
        }
        Command::Resume { tax_num, queue } => {
            let store = open(&config).await?;
            if store.resume(queue, &tax_num, now_ms()).await? {
                println!("{} {tax_num} resumed", queue.as_str());
            } else {
                println!("{} {tax_num} was not paused", queue.as_str());
            }
            Ok(())
        }
        Command::Sandbox { .. } => Ok(()),
        Command::Alert(AlertCommand::Test) => alert_test(&config).await,
    }
}

/// Why the database at `location` did not open, as the exit code tells it: a refused login
/// is a configuration problem (exit 2, naming `[database] url`), anything else a failure.
pub(crate) fn opening(location: &Location, e: StoreError) -> CliError {
    match e {
        StoreError::Connect { auth: true, .. } => CliError::Usage(e.to_string()),
        other => CliError::Runtime(
            anyhow::Error::from(other).context(format!("opening database {}", location.describe())),
        ),
    }
}

async fn open(config: &Config) -> Result<Database, CliError> {
    let location = config.database.location()?;
    let store = Database::open(&location)
        .await
        .map_err(|e| opening(&location, e))?;
    // An operator's resume tells the group chat too.
    Ok(store.with_alerts(!config.alert.is_empty()))
}

/// `alert test`: one message to every target, each answer printed.
async fn alert_test(config: &Config) -> Result<(), CliError> {
    let targets = config.alert_targets()?;
    if targets.is_empty() {
        return Err(CliError::Usage(
            "no [[alert]] target is configured".to_string(),
        ));
    }
    let instance = crate::daemon::instance_name();
    let results =
        crate::alerts::deliver::send_test(&targets, &instance, crate::store::now_ms()).await;
    let mut failed = 0;
    for (name, result) in results {
        match result {
            Ok(()) => println!("{name}: delivered"),
            Err(e) => {
                failed += 1;
                println!("{name}: FAILED: {e}");
            }
        }
    }
    if failed > 0 {
        return Err(CliError::Runtime(anyhow::anyhow!(
            "{failed} alert target(s) did not take the test message"
        )));
    }
    Ok(())
}

fn report_changed(what: &str, asked: &[i64], changed: &[i64]) {
    for id in asked {
        if changed.contains(id) {
            println!("{id}: {what}");
        } else {
            println!("{id}: unchanged (no such row, or not in a state that allows it)");
        }
    }
}

/// Validates the configuration and prints it redacted. Stricter than `run`, which starts
/// with a queue lacking credentials switched off: here a queue left enabled without them
/// is an error (exit 2) naming the missing keys, so that an installation is not started
/// half configured.
fn check_config(config: &Config, path: &std::path::Path) -> Result<(), CliError> {
    // Resolving credentials reads *_file secrets, so an unreadable file fails here too.
    let rebill = config.rebill_credentials()?;
    let title = config.title_credentials()?;
    let alerts = config.alert_targets()?;
    let database = config.database.location()?;
    warn_if_exposed(config, path);
    print!("{}", config.redacted_toml());
    println!();
    match &database {
        Location::Sqlite { path, .. } => println!("# database: SQLite file {}", path.display()),
        Location::Postgres(connect) => println!(
            "# database: PostgreSQL {} (password {})",
            crate::store::postgres::scrub_url(&connect.url),
            if connect.password.is_some() {
                "from database.password_file or $INVOICE_WORKER_DATABASE_PASSWORD"
            } else {
                "in the URL, or none"
            }
        ),
    }
    let mut missing = Vec::new();
    let rebill_state = if !config.rebill.enabled {
        "disabled by config"
    } else if rebill.is_some() {
        "enabled"
    } else {
        missing.push(format!(
            "rebill.appid and rebill.app_secret (or rebill.app_secret_file, or ${})",
            crate::config::ENV_REBILL_SECRET
        ));
        "credentials missing"
    };
    let title_state = if !config.title.enabled {
        "disabled by config"
    } else if title.is_some() {
        "enabled"
    } else {
        missing.push(format!(
            "title.base_url, title.client_id and title.client_secret (or title.client_secret_file, or ${})",
            crate::config::ENV_TITLE_SECRET
        ));
        "base_url or credentials missing"
    };
    println!("# rebill queue: {rebill_state}");
    println!("# title queue: {title_state}");
    if alerts.is_empty() {
        println!("# alerts: none configured");
    }
    for t in &alerts {
        let events = t.events.as_ref().map_or("all events".to_string(), |e| {
            e.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
        });
        let signed = if t.secret.is_some() { ", signed" } else { "" };
        println!(
            "# alert target {}: {}{signed}, {events}",
            t.name,
            t.kind.as_str()
        );
    }
    if !missing.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: missing credentials: {}; set them, or switch the queue off with enabled = false",
            path.display(),
            missing.join("; ")
        )));
    }
    println!("# config OK: {}", path.display());
    Ok(())
}

/// Warns when a config file holding an inline secret can be read by other users.
fn warn_if_exposed(config: &Config, path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if !config.has_inline_secret() {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(file = %path.display(), mode = format!("{:o}", mode & 0o777), "config file holds a secret and is readable by other users; chmod 600 it or use *_file / LoadCredential=");
        }
    }
}

async fn run_daemon(config: &Config, path: &std::path::Path) -> Result<(), CliError> {
    config.rebill_credentials()?;
    config.title_credentials()?;
    config.alert_targets()?;
    let location = config.database.location()?;
    warn_if_exposed(config, path);
    let store = Database::open(&location)
        .await
        .map_err(|e| opening(&location, e))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    crate::daemon::run_until_stopped(config, store, shutdown)
        .await
        .map_err(CliError::Runtime)
}

/// Cancels `shutdown` on SIGTERM or SIGINT (the binary's edge; library code never listens
/// for signals itself).
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

async fn enqueue(store: &Database, what: EnqueueCommand) -> Result<(), CliError> {
    match what {
        EnqueueCommand::Rebill {
            tax_num,
            orderno,
            max_attempts,
        } => {
            match store
                .enqueue_rebill(
                    &NewRebill {
                        orderno: orderno.clone(),
                        tax_num,
                        max_attempts,
                        not_before: None,
                    },
                    now_ms(),
                )
                .await?
            {
                Enqueued::Inserted(id) => println!("rebill row {id} enqueued (orderno {orderno})"),
                Enqueued::AlreadyActive => println!(
                    "an active rebill row for orderno {orderno} already exists; nothing inserted"
                ),
            }
        }
        EnqueueCommand::Title(args) => {
            let title = title_from_args(*args)?;
            let id = store.enqueue_title(&title).await?;
            println!(
                "title row {id} enqueued (ORDER_NO {})",
                title.fields.order_no
            );
        }
    }
    Ok(())
}

fn title_from_args(args: TitleArgs) -> Result<NewTitle, CliError> {
    if let Some(source) = &args.json {
        let mut text = String::new();
        if source == "-" {
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Usage(format!("--json -: cannot read stdin: {e}")))?;
        } else {
            text = std::fs::read_to_string(source)
                .map_err(|e| CliError::Usage(format!("--json {source}: {e}")))?;
        }
        let mut title: NewTitle = serde_json::from_str(&text)
            .map_err(|e| CliError::Usage(format!("--json {source}: {e}")))?;
        if args.sqm.is_some() {
            title.sqm = args.sqm;
        }
        if let Some(dt) = args.data_type.as_deref() {
            title.data_type = Some(if dt == "xml" { 1 } else { 0 });
        }
        return Ok(title);
    }
    let required = |value: Option<String>, flag: &str| {
        value.ok_or_else(|| CliError::Usage(format!("--{flag} is required")))
    };
    Ok(NewTitle {
        fields: TitleFields {
            order_no: required(args.order_no, "order-no")?,
            invoice_type: required(args.invoice_type, "invoice-type")?,
            ttqqlsh: args.ttqqlsh,
            attach: required(args.attach, "attach")?,
            gmf_mc: required(args.gmf_mc, "gmf-mc")?,
            gmf_nsrsbh: args.gmf_nsrsbh,
            gmf_dz: args.gmf_dz,
            gmf_dh: args.gmf_dh,
            gmf_yhzh: args.gmf_yhzh,
            gmf_yhmc: args.gmf_yhmc,
            remark: args.remark,
            by1: args.by1,
            by2: args.by2,
        },
        sqm: args.sqm,
        data_type: args.data_type.map(|dt| if dt == "xml" { 1 } else { 0 }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_is_accepted_after_the_subcommand() {
        let cli = Cli::try_parse_from(["invoice-worker", "status", "--config", "x.toml"])
            .expect("parses");
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
    }

    #[test]
    fn pause_parses_durations() {
        let cli = Cli::try_parse_from([
            "invoice-worker",
            "pause",
            "91310117568051222X",
            "--for",
            "30m",
        ])
        .expect("parses");
        match cli.command {
            Command::Pause {
                duration, queue, ..
            } => {
                assert_eq!(duration, Duration::from_secs(1800));
                assert_eq!(queue, QueueName::Rebill);
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
