//! The operator's window: Prometheus metrics and a health check over HTTP, and the gauges
//! (queue depth, oldest pending age, pauses) both they and systemd's `STATUS=` report.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::queue::heartbeat::{Heartbeat, WriteHealth};
use crate::store::{Database, QueueName};

/// How long `/healthz` waits for the database to answer `SELECT 1`.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The shortest time a loop may go without ticking before the watchdog calls it stuck: an
/// idle loop ticks every 2 s (`IDLE_TICK` in `queue::worker`) and a claim may wait a moment
/// for another process's write, so anything shorter would be noise.
const MIN_STUCK_AFTER: Duration = Duration::from_secs(5);

/// Request-latency histogram buckets, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle. Without it
/// the `metrics` macros cost nothing, which is why it is installed only when `[http]` is on.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .map_err(|e| tracing::error!(error = %e, "metrics buckets refused"))
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe_metrics();
                    Some(handle)
                }
                Err(e) => {
                    tracing::error!(error = %e, "another metrics recorder is installed; /metrics disabled");
                    None
                }
            }
        })
        .clone()
}

/// The `# HELP` lines of `/metrics`.
fn describe_metrics() {
    use metrics::Unit;
    metrics::describe_counter!("invoice_worker_attempts_total", "Attempts finished, by queue and action (done, retry, await_confirmation, pause_seller, pause_queue, fail, rejected).");
    metrics::describe_counter!(
        "invoice_worker_lost_claims_total",
        "Completions discarded because the row's lease had expired and the row was claimed again."
    );
    metrics::describe_counter!(
        "invoice_worker_alert_posts_total",
        "Alert posts to each [[alert]] target, by result (ok, failed)."
    );
    metrics::describe_histogram!(
        "invoice_worker_request_duration_seconds",
        Unit::Seconds,
        "Time to process one row that was sent: the remote call and, for titles, any token or openID refresh."
    );
    metrics::describe_gauge!(
        "invoice_worker_queue_depth",
        "Rows per queue and status, as the daemon last counted them (active rows every 2 s, finished rows less often on big tables)."
    );
    metrics::describe_gauge!(
        "invoice_worker_oldest_pending_age_seconds",
        Unit::Seconds,
        "How long the oldest pending row has been due (0 when none is due)."
    );
    metrics::describe_gauge!(
        "invoice_worker_awaiting_confirmation",
        "Pending rows the gateway accepted whose invoice number is still awaited ([rebill] confirm)."
    );
    metrics::describe_gauge!(
        "invoice_worker_paused_sellers",
        "Sellers of a queue currently paused or probing."
    );
    metrics::describe_gauge!(
        "invoice_worker_queue_paused",
        "1 while the whole queue is paused or probing, else 0."
    );
}

/// The systemd watchdog interval (`WatchdogSec=`) when the service manager asked this
/// process for pings. Reads the environment like libsystemd's `sd_watchdog_enabled`: a
/// missing `WATCHDOG_PID` means "this process" (sd-notify 0.4 insists on it).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on explicit values.
pub fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?
        .trim()
        .parse()
        .ok()
        .filter(|u| *u > 0 && *u < u64::MAX)?;
    match pid {
        Some(pid) if pid.trim().parse::<u32>().ok() != Some(me) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// How old a loop's heartbeat may get before the watchdog stops pinging: `WatchdogSec`,
/// but at least 5 s (idle loops tick every 2 s) and at most `health_max_age` (10 s,
/// what `/healthz` uses). systemd kills a hung daemon `WatchdogSec` after the last ping, so
/// about this plus `WatchdogSec` after the hang.
pub fn watchdog_stuck_after(watchdog: Duration, health_max_age: Duration) -> Duration {
    watchdog
        .max(MIN_STUCK_AFTER)
        .min(health_max_age.max(MIN_STUCK_AFTER))
}

/// What `/healthz` checks: the database answers and every worker loop went round recently.
#[derive(Clone)]
pub struct Health {
    /// The queue database.
    pub store: Database,
    /// (queue, claim-loop heartbeat) for every running worker.
    pub loops: Vec<(QueueName, Heartbeat)>,
    /// (queue, completer write health) for every running worker.
    pub writers: Vec<(QueueName, WriteHealth)>,
    /// How old a heartbeat may be before the loop counts as stuck.
    pub max_age: Duration,
}

impl Health {
    /// `Ok` when healthy, else the reason.
    pub async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(PING_TIMEOUT, self.store.ping()).await {
            Ok(true) => {}
            Ok(false) => return Err("database does not answer".to_string()),
            Err(_) => {
                return Err(format!(
                    "database did not answer within {} s",
                    PING_TIMEOUT.as_secs()
                ))
            }
        }
        self.loops_fresh()
    }

    /// `Ok` when every loop ticked within `max_age` (a loop whose claims fail does not
    /// tick) and no completer has failed to write results for longer (the watchdog's test).
    pub fn loops_fresh(&self) -> Result<(), String> {
        for (queue, beat) in &self.loops {
            if !beat.is_fresh(self.max_age) {
                return Err(format!(
                    "{} loop has not ticked for {} ms (stuck, or its claims fail)",
                    queue.as_str(),
                    beat.age_ms()
                ));
            }
        }
        for (queue, writes) in &self.writers {
            if let Some(failing) = writes.failing_for().filter(|f| *f > self.max_age) {
                return Err(format!(
                    "{} results cannot be written for {} ms (a full disk?)",
                    queue.as_str(),
                    failing.as_millis()
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: Option<PrometheusHandle>,
}

/// Serves `GET /metrics`, `GET /healthz` and the operator console on `listener` until
/// `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    console: std::sync::Arc<crate::console::Console>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        health,
        metrics: metrics_handle(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .with_state(state)
        .merge(crate::console::routes(console));
    // The console's login limit is per client address.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// Binds the metrics address (refusing nothing here: config validation did that) and
/// installs the recorder, so attempts made before the first scrape are counted.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let _ = metrics_handle();
    Ok(listener)
}

async fn metrics_page(State(state): State<AppState>) -> (StatusCode, String) {
    // The depth gauges are set by the daemon's counter (`depths`), never per scrape.
    match &state.metrics {
        Some(handle) => {
            handle.run_upkeep();
            (StatusCode::OK, handle.render())
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n".to_string(),
        ),
    }
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.check().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {reason}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_env_is_read_like_libsystemd() {
        let us = Some(Duration::from_secs(30));
        assert_eq!(parse_watchdog(Some("30000000"), Some("42"), 42), us);
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 42),
            us,
            "no WATCHDOG_PID means this process"
        );
        assert_eq!(
            parse_watchdog(Some("30000000"), Some("43"), 42),
            None,
            "meant for another process"
        );
        assert_eq!(parse_watchdog(None, Some("42"), 42), None);
        assert_eq!(parse_watchdog(Some("0"), None, 42), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 42), None);
    }

    #[test]
    fn stuck_after_follows_the_watchdog_within_bounds() {
        let ten = Duration::from_secs(10);
        let five = Duration::from_secs(5);
        assert_eq!(watchdog_stuck_after(Duration::from_secs(1), ten), five);
        assert_eq!(
            watchdog_stuck_after(Duration::from_secs(7), ten),
            Duration::from_secs(7)
        );
        assert_eq!(watchdog_stuck_after(Duration::from_secs(30), ten), ten);
    }
}
