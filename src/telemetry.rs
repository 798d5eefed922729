//! The tracing subscriber: logs to stderr for journald, plain text without colour when
//! stderr is not a terminal, or one JSON object per line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set and not empty, overrides
/// `[log] level`; an invalid `RUST_LOG` is reported and `[log] level` used instead.
/// Calling it twice is harmless (the second call changes nothing).
pub fn init(log: &LogConfig) {
    let (filter, bad_env) = filter_of(
        std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref(),
        &log.level,
    );
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (journald restarted, a pipe reader gone) must not panic a task.
        .log_internal_errors(false)
        .with_target(false);
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
    };
    if let Some((value, error)) = bad_env {
        tracing::warn!(rust_log = %value, %error, level = %log.level, "RUST_LOG is not a valid filter; using [log] level");
    }
}

/// The filter from `RUST_LOG` (when set and valid) or else from `level`, and the rejected
/// `RUST_LOG` with its error, if any. `level` alone keeps the cron scheduler's chatter
/// ("Uninited", "Job creator created") at `warn` unless it names that crate itself.
fn filter_of(env: Option<&str>, level: &str) -> (EnvFilter, Option<(String, String)>) {
    let from_config = || {
        let directives = if level.contains("tokio_cron_scheduler") {
            level.to_string()
        } else {
            format!("{level},tokio_cron_scheduler=warn")
        };
        EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"))
    };
    match env.map(str::trim).filter(|v| !v.is_empty()) {
        None => (from_config(), None),
        Some(value) => match EnvFilter::try_new(value) {
            Ok(filter) => (filter, None),
            Err(e) => (from_config(), Some((value.to_string(), e.to_string()))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::filter_of;

    #[test]
    fn rust_log_overrides_level_unless_empty_or_invalid() {
        let (f, bad) = filter_of(Some("debug"), "warn");
        assert!(bad.is_none());
        assert_eq!(f.to_string(), "debug");
        let (f, bad) = filter_of(Some("  "), "warn");
        assert!(bad.is_none());
        assert!(f.to_string().ends_with(",warn"), "{f}");
        let (f, bad) = filter_of(None, "info,invoice_worker=debug");
        assert!(bad.is_none());
        assert!(f.to_string().contains("invoice_worker=debug"), "{f}");
        let (f, bad) = filter_of(Some("foo=[[["), "warn");
        assert!(f.to_string().ends_with(",warn"), "{f}");
        assert!(f.to_string().contains("tokio_cron_scheduler=warn"), "{f}");
        assert!(bad.is_some());
    }
}
