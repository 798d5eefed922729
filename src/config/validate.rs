//! Checks on values that parsed but could still be wrong, and the rendering of toml's
//! own errors without the values they quote.

use std::time::Duration;

use url::Url;

use super::{invalid, Config, ConfigError, LimitsConfig, LogFormat};
use crate::queue::rules::MessageRule;

impl Config {
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
        if d.url.is_some() {
            if d.pool_size == 0 || d.pool_size > 1000 {
                return Err(invalid("database.pool_size", "must be between 1 and 1000"));
            }
            if d.connect_timeout.is_zero() {
                return Err(invalid(
                    "database.connect_timeout",
                    "must be greater than 0",
                ));
            }
            // The URL's shape and its keys' combinations; the password file is read when
            // the database is opened.
            d.location_without_password()?;
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
        if self.rebill.confirm_schedule.iter().any(|d| d.is_zero()) {
            return Err(invalid(
                "rebill.confirm_schedule",
                "every wait must be greater than 0",
            ));
        }
        if self.rebill.confirm_for.is_zero() {
            return Err(invalid("rebill.confirm_for", "must be greater than 0"));
        }
        let a = &self.alerting;
        for (key, value) in [
            ("alerting.digest_every", a.digest_every),
            ("alerting.stuck_after", a.stuck_after),
            ("alerting.give_up_after", a.give_up_after),
            ("alerting.report_failing_after", a.report_failing_after),
        ] {
            if value < Duration::from_secs(1) {
                return Err(invalid(key, "must be at least 1s"));
            }
        }
        if a.retry_delay.is_zero() {
            return Err(invalid("alerting.retry_delay", "must be greater than 0"));
        }
        for (i, target) in self.alert.iter().enumerate() {
            if target.rate_per_minute == 0 {
                return Err(invalid(
                    &format!("alert[{i}].rate_per_minute"),
                    "must be at least 1",
                ));
            }
        }
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
        let console_token = self.console_token()?;
        if let Some(listen) = self.http.listen {
            if !listen.ip().is_loopback() && !self.http.allow_remote {
                return Err(invalid(
                    "http.listen",
                    format!("{listen} is not a loopback address; set http.allow_remote = true to expose metrics"),
                ));
            }
            if !listen.ip().is_loopback() && console_token.is_none() {
                return Err(invalid(
                    "http.console_token",
                    format!("required when http.listen ({listen}) is not a loopback address: the console is reachable from the network"),
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
}

/// toml's own rendering quotes the offending line, value included; that line may hold a
/// secret, so only the line number, the key and toml's message are shown, and on a line
/// about a secret even the quoted parts of the message are dropped.
pub(super) fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().to_string();
    let Some(start) = error.span().map(|s| s.start) else {
        return message;
    };
    let before = text.get(..start).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    // A robot's URL carries its key: as secret as a secret.
    let message = if line.to_lowercase().contains("secret") || key == "url" {
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

/// Checks a cron expression the way tokio-cron-scheduler will parse it.
fn croner_like_check(expr: &str) -> Result<(), tokio_cron_scheduler::JobSchedulerError> {
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {})).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::super::key_of;
    use super::*;

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
                "[http]\nlisten = \"0.0.0.0:9000\"\nallow_remote = true\n",
                "http.console_token",
            ),
            ("[http]\nconsole_token = \"short\"\n", "http.console_token"),
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
}
