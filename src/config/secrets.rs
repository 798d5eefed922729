//! Secret resolution: an inline value, a `*_file` (with `$CREDENTIALS_DIRECTORY`
//! expanded) or the environment, and the credentials each queue needs.

use std::path::{Path, PathBuf};

use super::{invalid, Config, ConfigError};
use crate::secret::Secret;

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
