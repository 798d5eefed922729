//! Loads and validates `worker.toml`: strict keys, durations, secrets from inline values,
//! files or the environment. Produces plain options; builds no pools or clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::queue::rules::MessageRule;
use crate::secret::Secret;

/// The fw199 production endpoint for `rebillingnew`.
pub const DEFAULT_REBILL_ENDPOINT: &str =
    "https://kf.fw199.com/gateway/nuonuo/invoice/rebillingnew";

/// A configuration problem, naming the key at fault. The binary exits with code 2 on it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type, with the line and key.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, with the line number and the key, never the value.
        message: String,
    },
    /// A value that parsed but makes no sense.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted key, e.g. `rebill.endpoint`.
        key: String,
        /// What is wrong and what is expected.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

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
}

/// `[database]`: where the queue lives.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// SQLite file, created (mode 0600) if missing.
    pub path: PathBuf,
    /// How long a statement waits for another connection's write lock.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// The size the `-wal` file is kept under (`"16MiB"`, `"64 MB"`, or bytes).
    pub wal_limit: bytesize::ByteSize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            path: PathBuf::from("invoice-worker.db"),
            busy_timeout: Duration::from_secs(5),
            wal_limit: bytesize::ByteSize::b(crate::store::DEFAULT_WAL_LIMIT),
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
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            claim_batch: 64,
            shutdown_grace: Duration::from_secs(30),
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

/// `[http]`: the metrics and health endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to serve `/metrics` and `/healthz` on; absent = off.
    pub listen: Option<SocketAddr>,
    /// Allow a non-loopback `listen` address.
    pub allow_remote: bool,
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

/// Credentials for the rebill queue, resolved from wherever they were given.
#[derive(Debug, Clone)]
pub struct RebillCredentials {
    /// Partner AppId.
    pub appid: String,
    /// Partner AppSecret.
    pub app_secret: Secret,
}

/// Credentials for the title queue.
#[derive(Debug, Clone)]
pub struct TitleCredentials {
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Secret,
}

/// Environment variable that supplies the rebill AppSecret.
pub const ENV_REBILL_SECRET: &str = "INVOICE_WORKER_REBILL_APP_SECRET";
/// Environment variable that supplies the title client secret.
pub const ENV_TITLE_SECRET: &str = "INVOICE_WORKER_TITLE_CLIENT_SECRET";

impl Config {
    /// Reads and validates a config file. A missing file at the default path yields the
    /// defaults (so `run` works with no file); a missing file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let config = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: describe_toml_error(text, &e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that parsed but could still be wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.database;
        if d.path.as_os_str().is_empty() {
            return Err(invalid("database.path", "must not be empty"));
        }
        if d.wal_limit.as_u64() < 1024 * 1024 {
            return Err(invalid(
                "database.wal_limit",
                format!("{} is below the 1 MiB minimum", d.wal_limit),
            ));
        }
        let w = &self.worker;
        if w.lease < Duration::from_secs(1) {
            return Err(invalid("worker.lease", "must be at least 1s"));
        }
        if w.poll_interval.is_zero() {
            return Err(invalid("worker.poll_interval", "must be greater than 0"));
        }
        if w.claim_batch == 0 || w.claim_batch > 1000 {
            return Err(invalid("worker.claim_batch", "must be between 1 and 1000"));
        }
        let r = &self.retry;
        if r.base_delay.is_zero() {
            return Err(invalid("retry.base_delay", "must be greater than 0"));
        }
        if r.max_delay < r.base_delay {
            return Err(invalid(
                "retry.max_delay",
                "must not be shorter than retry.base_delay",
            ));
        }
        if !(0.0..1.0).contains(&r.jitter) {
            return Err(invalid(
                "retry.jitter",
                format!("{} is not a fraction in [0, 1)", r.jitter),
            ));
        }
        if r.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if r.max_per_day == 0 {
            return Err(invalid("retry.max_per_day", "must be at least 1"));
        }
        validate_limits("rebill", &self.rebill.limits)?;
        validate_limits("title", &self.title.limits)?;
        validate_rules("rebill", &self.rebill.rules)?;
        validate_rules("title", &self.title.rules)?;
        check_endpoint(
            "rebill.endpoint",
            &self.rebill.endpoint,
            self.rebill.allow_insecure_http,
        )?;
        if let Some(base) = &self.title.base_url {
            check_endpoint("title.base_url", base, self.title.allow_insecure_http)?;
        }
        let prefix = &self.title.ttqqlsh_prefix;
        if prefix.is_empty()
            || prefix.chars().count() > 8
            || !prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(invalid(
                "title.ttqqlsh_prefix",
                format!("{prefix:?}: must be 1 to 8 ASCII letters or digits (a serial is at most 20 characters)"),
            ));
        }
        if self.title.token_ttl < Duration::from_secs(1) {
            return Err(invalid("title.token_ttl", "must be at least 1s"));
        }
        if self.title.busi_type.is_empty() {
            return Err(invalid("title.busi_type", "must not be empty"));
        }
        if let Some(listen) = self.http.listen {
            if !listen.ip().is_loopback() && !self.http.allow_remote {
                return Err(invalid(
                    "http.listen",
                    format!("{listen} is not a loopback address; set http.allow_remote = true to expose metrics"),
                ));
            }
        }
        if self.log.format == LogFormat::Text && self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a valid filter", self.log.level),
            ));
        }
        let h = &self.housekeeping;
        if h.batch_size == 0 {
            return Err(invalid("housekeeping.batch_size", "must be at least 1"));
        }
        if h.enabled && croner_like_check(&h.schedule).is_err() {
            return Err(invalid(
                "housekeeping.schedule",
                format!("{:?} is not a cron expression with seconds (\"sec min hour day month weekday\")", h.schedule),
            ));
        }
        Ok(())
    }

    /// The rebill credentials, or why the queue cannot run (absent = disabled, not fatal).
    pub fn rebill_credentials(&self) -> Result<Option<RebillCredentials>, ConfigError> {
        let rebill = &self.rebill;
        let secret = resolve_secret(
            "rebill.app_secret",
            rebill.app_secret.as_ref(),
            rebill.app_secret_file.as_deref(),
            ENV_REBILL_SECRET,
        )?;
        match (rebill.appid.as_deref().filter(|a| !a.is_empty()), secret) {
            (Some(appid), Some(app_secret)) => Ok(Some(RebillCredentials {
                appid: appid.to_string(),
                app_secret,
            })),
            _ => Ok(None),
        }
    }

    /// The title credentials, or `None` when the queue lacks them.
    pub fn title_credentials(&self) -> Result<Option<TitleCredentials>, ConfigError> {
        let title = &self.title;
        let secret = resolve_secret(
            "title.client_secret",
            title.client_secret.as_ref(),
            title.client_secret_file.as_deref(),
            ENV_TITLE_SECRET,
        )?;
        match (
            title.client_id.as_deref().filter(|c| !c.is_empty()),
            secret,
            &title.base_url,
        ) {
            (Some(client_id), Some(client_secret), Some(_)) => Ok(Some(TitleCredentials {
                client_id: client_id.to_string(),
                client_secret,
            })),
            _ => Ok(None),
        }
    }

    /// True when any secret is written inline in the file (for the permissions warning).
    pub fn has_inline_secret(&self) -> bool {
        self.rebill.app_secret.is_some() || self.title.client_secret.is_some()
    }

    /// The effective configuration as TOML, every secret replaced by `***`.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// toml's own rendering quotes the offending line, value included; that line may hold a
/// secret, so only the line number, the key and toml's message are shown, and on a line
/// about a secret even the quoted parts of the message are dropped.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().to_string();
    let Some(start) = error.span().map(|s| s.start) else {
        return message;
    };
    let before = text.get(..start).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    let message = if line.to_lowercase().contains("secret") {
        message
            .split('`')
            .enumerate()
            .map(|(i, part)| if i % 2 == 1 { "…" } else { part })
            .collect::<Vec<_>>()
            .join("`")
    } else {
        message
    };
    if line.contains('=') {
        format!("line {line_no}, key `{key}`: {message}")
    } else {
        format!("line {line_no} `{key}`: {message}")
    }
}

fn validate_limits(queue: &str, limits: &LimitsConfig) -> Result<(), ConfigError> {
    if limits.max_in_flight == 0 || limits.max_in_flight > 1024 {
        return Err(invalid(
            &format!("{queue}.max_in_flight"),
            "must be between 1 and 1024",
        ));
    }
    if limits.rate_per_second == 0 {
        return Err(invalid(
            &format!("{queue}.rate_per_second"),
            "must be at least 1",
        ));
    }
    if limits.timeout < Duration::from_millis(100) {
        return Err(invalid(
            &format!("{queue}.timeout"),
            "must be at least 100ms",
        ));
    }
    Ok(())
}

fn validate_rules(queue: &str, rules: &[MessageRule]) -> Result<(), ConfigError> {
    for (i, rule) in rules.iter().enumerate() {
        if rule.contains.is_empty() {
            return Err(invalid(
                &format!("{queue}.rules[{i}].contains"),
                "must not be empty",
            ));
        }
        rule.validate()
            .map_err(|e| invalid(&format!("{queue}.rules[{i}].action"), e.to_string()))?;
        // Each table allows only its own outcomes.
        let allowed: &[&str] = match queue {
            "title" => &["done:sent"],
            _ => &["done:accepted", "done:issued", "done:in_progress"],
        };
        if rule.action.starts_with("done:") && !allowed.contains(&rule.action.as_str()) {
            return Err(invalid(
                &format!("{queue}.rules[{i}].action"),
                format!(
                    "{:?} is not an outcome of the {queue} queue; use one of {}",
                    rule.action,
                    allowed.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses URLs that are not http(s), and `http://` to anything but loopback unless allowed.
pub fn check_endpoint(
    key: &str,
    value: &str,
    allow_insecure_http: bool,
) -> Result<Url, ConfigError> {
    let url =
        Url::parse(value).map_err(|e| invalid(key, format!("{value:?} is not a URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback || allow_insecure_http {
                Ok(url)
            } else {
                let section = key.split('.').next().unwrap_or(key);
                Err(invalid(
                    key,
                    format!("{value:?} uses http:// to a non-loopback host; use https:// or set {section}.allow_insecure_http = true"),
                ))
            }
        }
        other => Err(invalid(
            key,
            format!("{value:?}: scheme {other:?} is not http or https"),
        )),
    }
}

/// Finds a secret: inline value, then `*_file`, then the environment. Two sources at once
/// is an error, so an operator never wonders which one is used.
fn resolve_secret(
    key: &str,
    inline: Option<&Secret>,
    file: Option<&Path>,
    env_var: &str,
) -> Result<Option<Secret>, ConfigError> {
    if inline.is_some() && file.is_some() {
        return Err(invalid(
            key,
            format!("set either {key} or {key}_file, not both"),
        ));
    }
    if let Some(secret) = inline {
        return Ok(Some(secret.clone()).filter(|s| !s.is_empty()));
    }
    if let Some(file) = file {
        let path = expand_credentials_dir(&format!("{key}_file"), file)?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            invalid(
                &format!("{key}_file"),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let value = text.trim_end_matches(['\r', '\n']).to_string();
        if value.is_empty() {
            return Err(invalid(
                &format!("{key}_file"),
                format!("{} is empty", path.display()),
            ));
        }
        return Ok(Some(Secret::new(value)));
    }
    Ok(std::env::var(env_var)
        .ok()
        .filter(|v| !v.is_empty())
        .map(Secret::new))
}

/// Expands a leading `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
fn expand_credentials_dir(key: &str, path: &Path) -> Result<PathBuf, ConfigError> {
    let text = path.to_string_lossy();
    for var in ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"] {
        if let Some(rest) = text.strip_prefix(var) {
            let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|_| {
                invalid(key, format!("{text} uses $CREDENTIALS_DIRECTORY, which is not set (LoadCredential= in the unit sets it)"))
            })?;
            return Ok(PathBuf::from(format!("{dir}{rest}")));
        }
    }
    Ok(path.to_path_buf())
}

/// Checks a cron expression the way tokio-cron-scheduler will parse it.
fn croner_like_check(expr: &str) -> Result<(), tokio_cron_scheduler::JobSchedulerError> {
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {})).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { key, .. } => key,
            other => other.to_string(),
        }
    }

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
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[retry]\nbase_dealy = \"1s\"\n").unwrap_err();
        assert!(err.to_string().contains("base_dealy"), "{err}");
        let err = Config::from_toml("[rebil]\n").unwrap_err();
        assert!(err.to_string().contains("rebil"), "{err}");
    }

    #[test]
    fn syntax_errors_never_echo_a_secret() {
        for text in [
            "[rebill]\nappid = \"A\"\napp_secret = s3cr3tVALUE\n",
            "[rebill]\napp_secret = \"s3cr3tVALUE\n",
            "[rebill]\napp_secret = 987654321\n",
            "[title]\nclient_secret = [\"s3cr3tVALUE\"]\n",
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(
                !err.contains("s3cr3tVALUE") && !err.contains("987654321"),
                "{err}"
            );
            assert!(err.contains("line"), "{err}");
        }
        let err = Config::from_toml("[rebill]\napp_secret = 987654321\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("app_secret"), "{err}");
    }

    #[test]
    fn malformed_durations_are_named() {
        let err = Config::from_toml("[retry]\nmax_delay = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("max_delay"), "{err}");
    }

    #[test]
    fn durations_parse() {
        let c =
            Config::from_toml("[retry]\nbase_delay = \"2s\"\nmax_delay = \"1h\"\n").expect("valid");
        assert_eq!(c.retry.base_delay, Duration::from_secs(2));
        assert_eq!(c.retry.max_delay, Duration::from_secs(3600));
    }

    #[test]
    fn values_out_of_range_name_their_key() {
        for (toml, key) in [
            ("[retry]\njitter = 1.5\n", "retry.jitter"),
            ("[retry]\nmax_attempts = 0\n", "retry.max_attempts"),
            ("[rebill]\nmax_in_flight = 0\n", "rebill.max_in_flight"),
            (
                "[title]\nttqqlsh_prefix = \"WAY-TOO-LONG\"\n",
                "title.ttqqlsh_prefix",
            ),
            ("[http]\nlisten = \"0.0.0.0:9000\"\n", "http.listen"),
            (
                "[housekeeping]\nschedule = \"every day\"\n",
                "housekeeping.schedule",
            ),
            (
                "[[rebill.rules]]\ncontains = \"x\"\naction = \"explode\"\n",
                "rebill.rules[0].action",
            ),
        ] {
            let err = Config::from_toml(toml).unwrap_err();
            assert_eq!(key_of(err), key, "for {toml}");
        }
    }

    #[test]
    fn insecure_http_is_refused_except_loopback() {
        let err = Config::from_toml("[rebill]\nendpoint = \"http://example.com/x\"\n").unwrap_err();
        assert_eq!(key_of(err), "rebill.endpoint");
        Config::from_toml("[rebill]\nendpoint = \"http://127.0.0.1:8080/x\"\n")
            .expect("loopback ok");
        Config::from_toml(
            "[rebill]\nendpoint = \"http://example.com/x\"\nallow_insecure_http = true\n",
        )
        .expect("explicitly allowed");
        let err = Config::from_toml("[title]\nbase_url = \"ftp://x/Entoauth\"\n").unwrap_err();
        assert_eq!(key_of(err), "title.base_url");
    }

    #[test]
    fn secrets_come_from_file_and_are_redacted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-file-secret\n").expect("write");
        let text = format!(
            "[rebill]\nappid = \"A1\"\napp_secret_file = \"{}\"\n",
            file.display()
        );
        let c = Config::from_toml(&text).expect("valid");
        let creds = c.rebill_credentials().expect("resolves").expect("present");
        assert_eq!(creds.app_secret.expose(), "from-file-secret");
        assert!(!format!("{creds:?}").contains("from-file-secret"));

        let inline =
            Config::from_toml("[rebill]\nappid = \"A1\"\napp_secret = \"inline-s3cret\"\n")
                .expect("valid");
        let shown = inline.redacted_toml();
        assert!(!shown.contains("inline-s3cret"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn both_inline_and_file_is_an_error() {
        let c = Config::from_toml(
            "[rebill]\nappid = \"A\"\napp_secret = \"x\"\napp_secret_file = \"/nope\"\n",
        )
        .expect("parses");
        assert_eq!(
            key_of(c.rebill_credentials().unwrap_err()),
            "rebill.app_secret"
        );
    }

    #[test]
    fn missing_credentials_disable_not_fail() {
        let c = Config::from_toml("").expect("valid");
        if std::env::var(ENV_REBILL_SECRET).is_err() {
            assert!(c.rebill_credentials().expect("ok").is_none());
        }
        assert!(c.title_credentials().expect("ok").is_none());
    }
}

#[cfg(test)]
mod shipped_file {
    use super::*;

    /// The commented worker.toml at the repository root must parse and equal the defaults.
    #[test]
    fn shipped_worker_toml_matches_the_defaults() {
        let text = include_str!("../worker.toml");
        let parsed = Config::from_toml(text).expect("worker.toml is valid");
        let defaults = Config::default();
        assert_eq!(parsed.redacted_toml(), defaults.redacted_toml());
    }
}
