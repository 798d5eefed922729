//! Loads and validates `worker.toml`: strict keys, durations, secrets from inline values,
//! files or the environment. Produces plain options; builds no pools or clients.
//!
//! The file's shape and defaults are in `schema`, the checks on its values in `validate`,
//! and where secrets come from in `secrets`; everything public is re-exported here.

use std::path::{Path, PathBuf};

mod schema;
mod secrets;
mod validate;

pub use schema::{
    AlertKind, AlertTargetConfig, AlertingConfig, Config, DataType, DatabaseConfig,
    HousekeepingConfig, HttpConfig, LimitsConfig, LogConfig, LogFormat, RebillConfig, RetryConfig,
    TitleConfig, WorkerConfig, DEFAULT_REBILL_ENDPOINT,
};
pub use secrets::{
    alert_env_prefix, AlertTarget, RebillCredentials, TitleCredentials, ENV_DATABASE_PASSWORD,
    ENV_REBILL_SECRET, ENV_TITLE_SECRET,
};
pub use validate::check_endpoint;

use validate::describe_toml_error;

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
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: describe_toml_error(text, &e),
        })?;
        config.database.path_given = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("database")?.get("path").map(|_| ()))
            .is_some();
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML, every secret replaced by `***`.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// The key an error names, or the whole message when it names none (for tests).
#[cfg(test)]
fn key_of(err: ConfigError) -> String {
    match err {
        ConfigError::Invalid { key, .. } => key,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod shipped_file {
    use super::*;

    /// The commented worker.toml at the repository root must parse and equal the defaults.
    #[test]
    fn shipped_worker_toml_matches_the_defaults() {
        let text = include_str!("../../worker.toml");
        let parsed = Config::from_toml(text).expect("worker.toml is valid");
        let defaults = Config::default();
        assert_eq!(parsed.redacted_toml(), defaults.redacted_toml());
    }
}
