//! The shape of `worker.toml`: one serde struct per table, each with its defaults.
//!
//! Every table denies unknown keys and fills in what is absent, so an empty file is a
//! complete configuration. Checks beyond types live in `validate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::queue::rules::MessageRule;
use crate::secret::Secret;

/// The fw199 production endpoint for `rebillingnew`.
pub const DEFAULT_REBILL_ENDPOINT: &str =
    "https://kf.fw199.com/gateway/nuonuo/invoice/rebillingnew";

/// The whole configuration file, with defaults filled in.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[database]`
    pub database: DatabaseConfig,
    /// `[worker]`
    pub worker: WorkerConfig,
    /// `[retry]`
    pub retry: RetryConfig,
    /// `[rebill]`
    pub rebill: RebillConfig,
    /// `[title]`
    pub title: TitleConfig,
    /// `[http]`
    pub http: HttpConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[housekeeping]`
    pub housekeeping: HousekeepingConfig,
    /// `[alerting]`: when alerts are raised.
    pub alerting: AlertingConfig,
    /// `[[alert]]`: where alerts go (group-chat robots, webhooks); none = no alerts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alert: Vec<AlertTargetConfig>,
}

/// `[database]`: where the queue lives. Its `Debug` shows the URL without its password.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// SQLite file, created if missing (mode 0600, or 0660 with `group_writable`).
    pub path: PathBuf,
    /// How long a statement waits for another connection's write lock.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// The size the `-wal` file is kept under (`"16MiB"`, `"64 MB"`, or bytes).
    pub wal_limit: bytesize::ByteSize,
    /// Database files 0660 instead of 0600, so that writers in the daemon's group (other
    /// systems inserting rows) need not run as the daemon's user.
    pub group_writable: bool,
    /// `postgres://user@host:5432/db` (several daemons on several hosts share it) or
    /// `sqlite:///path`; unset = the SQLite file at `path`. Shown without its password.
    #[serde(
        serialize_with = "serialize_scrubbed_url",
        skip_serializing_if = "Option::is_none"
    )]
    pub url: Option<String>,
    /// A file holding the PostgreSQL password (`$CREDENTIALS_DIRECTORY` is expanded); it
    /// wins over one in `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Most PostgreSQL connections this daemon holds.
    pub pool_size: u32,
    /// How long connecting to PostgreSQL (or waiting for a pooled connection) may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// PostgreSQL cancels any statement running longer ("0s" = no limit).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Whether the file named `path` itself (not left at its default), so that `path` and
    /// `url` together can be refused.
    #[serde(skip)]
    pub path_given: bool,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("path", &self.path)
            .field("busy_timeout", &self.busy_timeout)
            .field("wal_limit", &self.wal_limit)
            .field("group_writable", &self.group_writable)
            .field(
                "url",
                &self.url.as_deref().map(crate::store::postgres::scrub_url),
            )
            .field("password_file", &self.password_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("path_given", &self.path_given)
            .finish()
    }
}

fn serialize_scrubbed_url<S: serde::Serializer>(
    url: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_str(&crate::store::postgres::scrub_url(url)),
        None => serializer.serialize_none(),
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            path: PathBuf::from("invoice-worker.db"),
            busy_timeout: Duration::from_secs(5),
            wal_limit: bytesize::ByteSize::b(crate::store::DEFAULT_WAL_LIMIT),
            group_writable: false,
            url: None,
            password_file: None,
            pool_size: 10,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            path_given: false,
        }
    }
}

/// `[worker]`: claiming, leases, shutdown.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// How long a claim holds a row before another daemon may take it; renewed every
    /// third of it while the call is in flight.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often the database is polled for commits by other processes, on file systems
    /// without reliable change notifications (NFS, SMB, FUSE); elsewhere inotify tells at
    /// once and nothing is polled.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Most rows claimed in one transaction.
    pub claim_batch: u32,
    /// How long in-flight calls may run on after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Whether every attempt is recorded in `attempt_history` (for `show` and the console),
    /// in the transaction that records its result.
    pub history: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            claim_batch: 64,
            shutdown_grace: Duration::from_secs(30),
            history: true,
        }
    }
}

/// `[retry]`: backoff shared by both queues.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delay after the first failed attempt.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Random spread, as a fraction (0.2 = ±20 %).
    pub jitter: f64,
    /// Attempts before a row is `failed` (a row's own `max_attempts` overrides).
    pub max_attempts: u32,
    /// Most attempts of one row in any 24 h (Nuonuo allows 20 retries per order a day).
    pub max_per_day: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            base_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(3600),
            jitter: 0.2,
            max_attempts: 50,
            max_per_day: 20,
        }
    }
}

/// Settings both remote queues have: limits, pauses, extra rules.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests in flight at once.
    pub max_in_flight: u32,
    /// Requests started per second.
    pub rate_per_second: u32,
    /// Whole-request timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Length of a seller pause (SMS login needed and the like).
    #[serde(with = "humantime_serde")]
    pub seller_pause: Duration,
    /// Length of a queue pause (credential errors, quota).
    #[serde(with = "humantime_serde")]
    pub queue_pause: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_in_flight: 8,
            rate_per_second: 20,
            timeout: Duration::from_secs(15),
            seller_pause: Duration::from_secs(30 * 60),
            queue_pause: Duration::from_secs(30 * 60),
        }
    }
}

/// `[rebill]`: the fw199 `rebillingnew` queue.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebillConfig {
    /// Whether this queue runs at all.
    pub enabled: bool,
    /// The `rebillingnew` URL.
    pub endpoint: String,
    /// Partner AppId.
    pub appid: Option<String>,
    /// Partner AppSecret, inline (prefer `app_secret_file` or the environment).
    pub app_secret: Option<Secret>,
    /// A file holding the AppSecret; `$CREDENTIALS_DIRECTORY` is expanded.
    pub app_secret_file: Option<PathBuf>,
    /// Allow `http://` to a non-loopback host (never in production).
    pub allow_insecure_http: bool,
    /// Limits and pauses.
    #[serde(flatten)]
    pub limits: LimitsConfig,
    /// Extra `message contains → action` rules, checked before the built-in ones.
    pub rules: Vec<MessageRule>,
    /// Keep an accepted (code 0) or in-progress row pending and call again until the
    /// gateway answers with its invoice number (code 100).
    pub confirm: bool,
    /// The waits between confirmation checks, counted from the first acceptance; the last
    /// one repeats.
    pub confirm_schedule: Vec<humantime_serde::Serde<Duration>>,
    /// How long a row is checked before it is left `done`/`accepted` without a number.
    #[serde(with = "humantime_serde")]
    pub confirm_for: Duration,
}

impl Default for RebillConfig {
    fn default() -> Self {
        RebillConfig {
            enabled: true,
            endpoint: DEFAULT_REBILL_ENDPOINT.to_string(),
            appid: None,
            app_secret: None,
            app_secret_file: None,
            allow_insecure_http: false,
            limits: LimitsConfig::default(),
            rules: Vec::new(),
            confirm: false,
            confirm_schedule: [2 * 60, 10 * 60, 30 * 60, 3600]
                .map(|s| Duration::from_secs(s).into())
                .to_vec(),
            confirm_for: Duration::from_secs(3 * 86400),
        }
    }
}

/// Payload format for FPTT1001 `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// `dataType=0`
    #[default]
    Json,
    /// `dataType=1`
    Xml,
}

impl DataType {
    /// The wire value of `dataType`.
    pub fn code(self) -> u8 {
        match self {
            DataType::Json => 0,
            DataType::Xml => 1,
        }
    }

    /// From the wire / column value.
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(DataType::Json),
            1 => Some(DataType::Xml),
            _ => None,
        }
    }
}

/// `[title]`: the 开票精灵 FPTT1001 queue.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TitleConfig {
    /// Whether this queue runs at all.
    pub enabled: bool,
    /// The platform's `https://IP:PORT/Entoauth` base URL.
    pub base_url: Option<String>,
    /// OAuth client id (应用 ID).
    pub client_id: Option<String>,
    /// OAuth client secret, inline.
    pub client_secret: Option<Secret>,
    /// A file holding the client secret; `$CREDENTIALS_DIRECTORY` is expanded.
    pub client_secret_file: Option<PathBuf>,
    /// A fixed openID; when set, OpenAction is never called.
    pub openid: Option<String>,
    /// Default 开票精灵 authorisation code; a row's `sqm` overrides it.
    pub sqm: Option<String>,
    /// `busiType` query parameter.
    pub busi_type: String,
    /// Default payload format for rows whose `data_type` is NULL.
    pub data_type: DataType,
    /// Company prefix of generated serial numbers (TTQQLSH).
    pub ttqqlsh_prefix: String,
    /// How long a token and openID are used before renewing them.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Accept 18-character buyer tax ids whose GB 32100 check digit fails (sandbox data).
    pub lenient_tax_id: bool,
    /// Allow `http://` to a non-loopback host (never in production).
    pub allow_insecure_http: bool,
    /// Limits and pauses.
    #[serde(flatten)]
    pub limits: LimitsConfig,
    /// Extra `message contains → action` rules, checked before the built-in ones.
    pub rules: Vec<MessageRule>,
}

impl Default for TitleConfig {
    fn default() -> Self {
        TitleConfig {
            enabled: true,
            base_url: None,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            openid: None,
            sqm: None,
            busi_type: "SQM_KPJL".to_string(),
            data_type: DataType::Json,
            ttqqlsh_prefix: "IW".to_string(),
            token_ttl: Duration::from_secs(2 * 3600),
            lenient_tax_id: false,
            allow_insecure_http: false,
            limits: LimitsConfig::default(),
            rules: Vec::new(),
        }
    }
}

/// `[http]`: the metrics and health endpoint, and the operator console.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to serve `/metrics`, `/healthz` and the console on; absent = off.
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback `listen` address (then `console_token` is required).
    pub allow_remote: bool,
    /// The console's login token, inline (prefer `console_token_file` or the
    /// environment). Without it the console is read-only.
    pub console_token: Option<Secret>,
    /// A file holding the console token (`$CREDENTIALS_DIRECTORY` expanded).
    pub console_token_file: Option<PathBuf>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain text (no colour unless stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `invoice_worker=debug`); `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

/// `[housekeeping]`: pruning finished rows and tending the database file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HousekeepingConfig {
    /// Whether housekeeping runs.
    pub enabled: bool,
    /// A cron expression with seconds (tokio-cron-scheduler syntax), in UTC.
    pub schedule: String,
    /// How long `done` rows are kept.
    #[serde(with = "humantime_serde")]
    pub done_retention: Duration,
    /// How long `failed`, `rejected` and `cancelled` rows are kept.
    #[serde(with = "humantime_serde")]
    pub failed_retention: Duration,
    /// Rows deleted per short transaction.
    pub batch_size: u32,
}

impl Default for HousekeepingConfig {
    fn default() -> Self {
        HousekeepingConfig {
            enabled: true,
            schedule: "0 17 19 * * *".to_string(),
            done_retention: Duration::from_secs(30 * 86400),
            failed_retention: Duration::from_secs(180 * 86400),
            batch_size: 500,
        }
    }
}

/// `[alerting]`: when the daemon raises alerts, and how long it tries to deliver them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// At most one "rows failed permanently" digest per this interval.
    #[serde(with = "humantime_serde")]
    pub digest_every: Duration,
    /// A queue whose oldest due pending row waited longer than this is reported stuck.
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    /// How long one alert is retried before it is given up (and logged as lost).
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// A target failing for this long is reported in the log and in `status`.
    #[serde(with = "humantime_serde")]
    pub report_failing_after: Duration,
    /// The wait after an alert's first failed delivery, doubled each time up to 5 min.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            digest_every: Duration::from_secs(15 * 60),
            stuck_after: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(86400),
            report_failing_after: Duration::from_secs(3600),
            retry_delay: Duration::from_secs(5),
        }
    }
}

/// The robot or endpoint an `[[alert]]` entry posts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// 企业微信 group robot (`qyapi.weixin.qq.com/cgi-bin/webhook/send?key=…`).
    Wecom,
    /// 钉钉 custom robot (`oapi.dingtalk.com/robot/send?access_token=…`), signed with `secret`.
    Dingtalk,
    /// 飞书 custom bot (`open.feishu.cn/open-apis/bot/v2/hook/…`), signed with `secret`.
    Feishu,
    /// Any HTTPS endpoint taking the event as JSON, HMAC-signed with `secret`.
    Webhook,
}

impl AlertKind {
    /// The name used in config, logs and `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Wecom => "wecom",
            AlertKind::Dingtalk => "dingtalk",
            AlertKind::Feishu => "feishu",
            AlertKind::Webhook => "webhook",
        }
    }
}

/// One `[[alert]]` entry: a place alerts are posted to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertTargetConfig {
    /// What kind of robot or endpoint it is.
    pub kind: AlertKind,
    /// A name for logs and `status` (default `KIND-N`, N counting entries from 1); also
    /// names the environment variables `INVOICE_WORKER_ALERT_<NAME>_URL` / `_SECRET`.
    #[serde(default)]
    pub name: Option<String>,
    /// The robot's URL, inline: a secret, it carries the robot's key.
    #[serde(default)]
    pub url: Option<Secret>,
    /// A file holding the URL; `$CREDENTIALS_DIRECTORY` is expanded.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// The signing secret (DingTalk 加签, Feishu 签名校验, webhook HMAC), inline.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// A file holding the signing secret.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Only these events (`seller_paused`, `queue_paused`, `pause_lifted`, `rows_failed`,
    /// `queue_stuck`, `queue_recovered`); absent = all of them.
    #[serde(default)]
    pub events: Option<Vec<crate::alerts::EventKind>>,
    /// Messages per minute this target is sent at most (WeCom and DingTalk robots allow 20).
    #[serde(default = "default_alert_rate")]
    pub rate_per_minute: u32,
    /// Allow `http://` to a non-loopback host (never in production).
    #[serde(default)]
    pub allow_insecure_http: bool,
}

fn default_alert_rate() -> u32 {
    20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("").expect("defaults are valid");
        assert_eq!(c.retry.max_attempts, 50);
        assert_eq!(c.retry.base_delay, Duration::from_secs(30));
        assert_eq!(c.rebill.limits.max_in_flight, 8);
        assert_eq!(c.rebill.limits.rate_per_second, 20);
        assert_eq!(c.title.busi_type, "SQM_KPJL");
        assert_eq!(c.title.token_ttl, Duration::from_secs(7200));
        assert!(c.http.listen.is_none());
    }

    #[test]
    fn the_whole_config_debug_printed_shows_no_database_password() {
        let c = Config::from_toml(
            "[database]\nurl = \"postgres://worker:s3cret-pw@db.example:5432/invoices\"\n",
        )
        .expect("valid");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(
            shown.contains("db.example"),
            "the rest of the URL is shown: {shown}"
        );
    }

    #[test]
    fn durations_parse() {
        let c =
            Config::from_toml("[retry]\nbase_delay = \"2s\"\nmax_delay = \"1h\"\n").expect("valid");
        assert_eq!(c.retry.base_delay, Duration::from_secs(2));
        assert_eq!(c.retry.max_delay, Duration::from_secs(3600));
    }
}
