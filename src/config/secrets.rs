//! Secret resolution: an inline value, a `*_file` (with `$CREDENTIALS_DIRECTORY`
//! expanded) or the environment, and the credentials each queue needs.

use std::path::{Path, PathBuf};

use super::{invalid, AlertKind, Config, ConfigError, DatabaseConfig};
use crate::alerts::EventKind;
use crate::secret::Secret;
use crate::store::database::Location;
use crate::store::postgres::{scrub_url, PgConnect};
use crate::store::FileMode;

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
/// Environment variable that supplies the PostgreSQL password.
pub const ENV_DATABASE_PASSWORD: &str = "INVOICE_WORKER_DATABASE_PASSWORD";
/// Environment variable that supplies the console's login token.
pub const ENV_CONSOLE_TOKEN: &str = "INVOICE_WORKER_HTTP_CONSOLE_TOKEN";

/// The shortest console token accepted: it is the only thing between the network and the
/// console's actions.
pub const MIN_CONSOLE_TOKEN_CHARS: usize = 16;

impl Config {
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

    /// The console's login token, if one is configured (without it the console is
    /// read-only). A token shorter than 16 characters is an error naming the key.
    pub fn console_token(&self) -> Result<Option<Secret>, ConfigError> {
        let token = resolve_secret(
            "http.console_token",
            self.http.console_token.as_ref(),
            self.http.console_token_file.as_deref(),
            ENV_CONSOLE_TOKEN,
        )?;
        if let Some(t) = &token {
            if t.expose().chars().count() < MIN_CONSOLE_TOKEN_CHARS {
                return Err(invalid(
                    "http.console_token",
                    format!("must be at least {MIN_CONSOLE_TOKEN_CHARS} characters (try `openssl rand -hex 16`)"),
                ));
            }
        }
        Ok(token)
    }

    /// True when any secret is written inline in the file (for the permissions warning).
    pub fn has_inline_secret(&self) -> bool {
        self.rebill.app_secret.is_some()
            || self.database.url.as_deref().is_some_and(url_has_password)
            || self.title.client_secret.is_some()
            || self.http.console_token.is_some()
            || self
                .alert
                .iter()
                .any(|a| a.url.is_some() || a.secret.is_some())
    }

    /// Every `[[alert]]` target with its URL and signing secret resolved. An entry without
    /// a URL anywhere is an error naming it: an alert that silently goes nowhere is worse
    /// than none.
    pub fn alert_targets(&self) -> Result<Vec<AlertTarget>, ConfigError> {
        let mut targets: Vec<AlertTarget> = Vec::with_capacity(self.alert.len());
        for (i, entry) in self.alert.iter().enumerate() {
            let key = format!("alert[{i}]");
            let name = entry
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}", entry.kind.as_str(), i + 1));
            if name.is_empty() || targets.iter().any(|t| t.name == name) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("{name:?}: every alert target needs a name of its own"),
                ));
            }
            let env = alert_env_prefix(&name);
            let url = resolve_secret(
                &format!("{key}.url"),
                entry.url.as_ref(),
                entry.url_file.as_deref(),
                &format!("{env}_URL"),
            )?
            .ok_or_else(|| {
                invalid(
                    &format!("{key}.url"),
                    format!("target {name:?} has no URL: set url, url_file or {env}_URL"),
                )
            })?;
            super::check_endpoint(
                &format!("{key}.url"),
                url.expose(),
                entry.allow_insecure_http,
            )
            .map_err(|_| {
                invalid(
                    &format!("{key}.url"),
                    "must be an https:// URL (http:// only to loopback or with allow_insecure_http)",
                )
            })?;
            let secret = resolve_secret(
                &format!("{key}.secret"),
                entry.secret.as_ref(),
                entry.secret_file.as_deref(),
                &format!("{env}_SECRET"),
            )?;
            targets.push(AlertTarget {
                name,
                kind: entry.kind,
                url,
                secret,
                events: entry.events.clone(),
                rate_per_minute: entry.rate_per_minute,
            });
        }
        Ok(targets)
    }
}

impl DatabaseConfig {
    /// Where the queue lives: the SQLite file (`path`, or a `sqlite://` URL) or the
    /// PostgreSQL server with its password resolved (`password_file`, then
    /// `$INVOICE_WORKER_DATABASE_PASSWORD`, then the URL's own). Errors name the key.
    pub fn location(&self) -> Result<Location, ConfigError> {
        let mut location = self.location_without_password()?;
        if let Location::Postgres(connect) = &mut location {
            connect.password = resolve_secret(
                "database.password",
                None,
                self.password_file.as_deref(),
                ENV_DATABASE_PASSWORD,
            )?;
        }
        Ok(location)
    }

    /// [`DatabaseConfig::location`] without reading the password (the checks at load).
    pub(super) fn location_without_password(&self) -> Result<Location, ConfigError> {
        let sqlite = |path: PathBuf| Location::Sqlite {
            path,
            busy_timeout: self.busy_timeout,
            wal_limit: self.wal_limit.as_u64(),
            mode: FileMode::of(self.group_writable),
        };
        let Some(url) = self.url.as_deref() else {
            if self.password_file.is_some() {
                return Err(invalid(
                    "database.password_file",
                    "is only used with a postgres:// database.url",
                ));
            }
            return Ok(sqlite(self.path.clone()));
        };
        if self.path_given {
            return Err(invalid(
                "database.url",
                "set either database.path or database.url, not both",
            ));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() || path.contains('?') {
                return Err(invalid(
                    "database.url",
                    "a SQLite URL is sqlite:///absolute/path or sqlite://relative/path, without options",
                ));
            }
            if self.password_file.is_some() {
                return Err(invalid(
                    "database.password_file",
                    "is only used with a postgres:// database.url",
                ));
            }
            return Ok(sqlite(PathBuf::from(path)));
        }
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "database.url",
                format!(
                    "{} must start with postgres://, postgresql:// or sqlite://",
                    scrub_url(url)
                ),
            ));
        }
        match url::Url::parse(url) {
            Ok(parsed) if parsed.host_str().is_some_and(|h| !h.is_empty()) => {}
            _ => {
                return Err(invalid(
                    "database.url",
                    format!(
                        "{} is not a URL of the form postgres://user@host:5432/database",
                        scrub_url(url)
                    ),
                ))
            }
        }
        Ok(Location::Postgres(PgConnect {
            url: url.to_string(),
            password: None,
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
            statement_timeout: self.statement_timeout,
        }))
    }
}

/// Whether a database URL carries a password of its own (userinfo or `password=`).
fn url_has_password(url: &str) -> bool {
    url::Url::parse(url)
        .is_ok_and(|u| u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password"))
}

/// `INVOICE_WORKER_ALERT_<NAME>`: the name upper-cased, anything but letters and digits
/// turned into `_`.
pub fn alert_env_prefix(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("INVOICE_WORKER_ALERT_{name}")
}

/// One `[[alert]]` target, resolved: where to post and how to sign.
#[derive(Debug, Clone)]
pub struct AlertTarget {
    /// Its name in logs, `status` and the outbox.
    pub name: String,
    /// What kind of robot or endpoint it is.
    pub kind: AlertKind,
    /// The URL (it carries the robot's key, so it is a secret).
    pub url: Secret,
    /// The signing secret, when the robot uses one.
    pub secret: Option<Secret>,
    /// The events it wants; `None` = all.
    pub events: Option<Vec<EventKind>>,
    /// Most messages per minute.
    pub rate_per_minute: u32,
}

impl AlertTarget {
    /// Whether this target wants events of `kind` (a test message goes everywhere).
    pub fn wants(&self, kind: EventKind) -> bool {
        kind == EventKind::Test
            || self
                .events
                .as_ref()
                .is_none_or(|events| events.contains(&kind))
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

#[cfg(test)]
mod tests {
    use super::super::key_of;
    use super::*;

    fn database(text: &str) -> Result<Location, ConfigError> {
        Config::from_toml(&format!("[database]\n{text}\n"))?
            .database
            .location()
    }

    #[test]
    fn the_database_is_a_sqlite_file_unless_a_url_says_otherwise() {
        let Location::Sqlite { path, .. } = database("").expect("defaults") else {
            panic!("the default is SQLite");
        };
        assert_eq!(path, PathBuf::from("invoice-worker.db"));
        let Location::Sqlite { path, .. } =
            database("url = \"sqlite:///var/lib/invoice-worker/q.db\"").expect("sqlite url")
        else {
            panic!("a sqlite:// URL is SQLite");
        };
        assert_eq!(path, PathBuf::from("/var/lib/invoice-worker/q.db"));
        let Location::Postgres(pg) = database(
            "url = \"postgres://worker@db.example:5432/invoices?sslmode=require\"\npool_size = 4\nstatement_timeout = \"5s\"",
        )
        .expect("postgres url") else {
            panic!("a postgres:// URL is PostgreSQL");
        };
        assert_eq!(
            pg.url,
            "postgres://worker@db.example:5432/invoices?sslmode=require"
        );
        assert_eq!(pg.pool_size, 4);
        assert_eq!(pg.statement_timeout, std::time::Duration::from_secs(5));
    }

    #[test]
    fn path_and_url_together_and_stray_keys_are_errors_naming_them() {
        let both = database("path = \"q.db\"\nurl = \"postgres://w@h/db\"").expect_err("both");
        assert!(
            both.to_string().contains("database.path or database.url"),
            "{both}"
        );
        assert_eq!(key_of(both), "database.url");
        let stray = database("password_file = \"/run/pw\"").expect_err("no url");
        assert_eq!(key_of(stray), "database.password_file");
        for (text, key) in [
            ("url = \"mysql://u:hunter2@h/db\"", "database.url"),
            ("url = \"postgres://u:hunter2@/db\"", "database.url"),
            ("url = \"sqlite://\"", "database.url"),
            (
                "url = \"postgres://u@h/db\"\npool_size = 0",
                "database.pool_size",
            ),
            (
                "url = \"postgres://u@h/db\"\nconnect_timeout = \"0s\"",
                "database.connect_timeout",
            ),
        ] {
            let e = database(text).expect_err(text);
            assert!(!e.to_string().contains("hunter2"), "{e}");
            assert_eq!(key_of(e), key, "{text}");
        }
    }

    #[test]
    fn the_database_password_comes_from_its_file_and_is_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "file-pa55word\n").expect("write");
        let text = format!(
            "[database]\nurl = \"postgres://worker:url-pa55word@db:5432/q\"\npassword_file = \"{}\"\n",
            file.display()
        );
        let c = Config::from_toml(&text).expect("valid");
        let Location::Postgres(pg) = c.database.location().expect("resolves") else {
            panic!("postgres");
        };
        assert_eq!(
            pg.password.as_ref().map(Secret::expose),
            Some("file-pa55word")
        );
        let shown = format!(
            "{}{pg:?}{}",
            c.redacted_toml(),
            Location::Postgres(pg.clone()).describe()
        );
        for secret in ["file-pa55word", "url-pa55word"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("worker:***@db:5432/q"), "{shown}");
        assert!(
            c.has_inline_secret(),
            "a password in the URL is an inline secret"
        );
        let missing = Config::from_toml(
            "[database]\nurl = \"postgres://w@h/db\"\npassword_file = \"/nonexistent/pw\"\n",
        )
        .expect("loads: the file is read when the database is opened");
        assert_eq!(
            key_of(missing.database.location().expect_err("unreadable")),
            "database.password_file"
        );
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
    fn alert_targets_take_their_url_from_a_file_or_inline_and_name_their_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("url");
        std::fs::write(
            &file,
            "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=from-file\n",
        )
        .expect("write");
        // (The environment is tested through the binary: setting a variable here would
        // race with the other tests' threads.)
        let env = format!("{}_URL", alert_env_prefix("ops.feishu-unit"));
        assert_eq!(env, "INVOICE_WORKER_ALERT_OPS_FEISHU_UNIT_URL");
        let text = format!(
            "[[alert]]\nkind = \"wecom\"\nurl_file = \"{}\"\nevents = [\"seller_paused\"]\n\n\
             [[alert]]\nkind = \"feishu\"\nname = \"ops.feishu-unit\"\nurl = \"https://open.feishu.cn/open-apis/bot/v2/hook/inline\"\nsecret = \"s\"\n\n\
             [[alert]]\nkind = \"webhook\"\nurl = \"https://hooks.example.com/x\"\n",
            file.display()
        );
        let c = Config::from_toml(&text).expect("valid");
        let targets = c.alert_targets().expect("resolves");
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["wecom-1", "ops.feishu-unit", "webhook-3"]);
        assert!(targets[0].url.expose().ends_with("key=from-file"));
        assert!(targets[1].url.expose().ends_with("/inline"));
        assert_eq!(targets[1].secret.as_ref().map(Secret::expose), Some("s"));
        assert!(
            targets[0].wants(EventKind::SellerPaused) && !targets[0].wants(EventKind::RowsFailed)
        );
        assert!(
            targets[0].wants(EventKind::Test),
            "a test message goes everywhere"
        );
        assert!(targets[2].wants(EventKind::RowsFailed));
        assert!(!format!("{targets:?}").contains("from-file"));
        let missing =
            Config::from_toml("[[alert]]\nkind = \"feishu\"\nname = \"ops.feishu-unit\"\n")
                .expect("parses")
                .alert_targets()
                .unwrap_err()
                .to_string();
        assert!(
            missing.contains("alert[0].url") && missing.contains(&env),
            "{missing}"
        );
        let err = Config::from_toml(
            "[[alert]]\nkind = \"wecom\"\nurl = \"https://a/\"\nurl_file = \"/x\"\n",
        )
        .expect("parses")
        .alert_targets()
        .unwrap_err();
        assert_eq!(key_of(err), "alert[0].url");
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
