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

use crate::queue::heartbeat::Heartbeat;
use crate::store::{now_ms, QueueName, Store};

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
                Ok(()) => Some(handle),
                Err(e) => {
                    tracing::error!(error = %e, "another metrics recorder is installed; /metrics disabled");
                    None
                }
            }
        })
        .clone()
}

/// What `/healthz` checks: the database answers and every worker loop went round recently.
#[derive(Clone)]
pub struct Health {
    /// The queue database.
    pub store: Store,
    /// (queue, claim-loop heartbeat) for every running worker.
    pub loops: Vec<(QueueName, Heartbeat)>,
    /// How old a heartbeat may be before the loop counts as stuck.
    pub max_age: Duration,
}

impl Health {
    /// `Ok` when healthy, else the reason.
    pub async fn check(&self) -> Result<(), String> {
        if !self.store.ping().await {
            return Err("database does not answer".to_string());
        }
        self.loops_fresh()
    }

    /// `Ok` when every loop ticked within `max_age` (the watchdog's test).
    pub fn loops_fresh(&self) -> Result<(), String> {
        for (queue, beat) in &self.loops {
            if !beat.is_fresh(self.max_age) {
                return Err(format!(
                    "{} loop has not ticked for {} ms",
                    queue.as_str(),
                    beat.age_ms()
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

/// Serves `GET /metrics` and `GET /healthz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        health,
        metrics: metrics_handle(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds the metrics address (refusing nothing here: config validation did that).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics_page(State(state): State<AppState>) -> (StatusCode, String) {
    refresh_gauges(&state.health.store).await;
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

/// Queue depth by status for both queues, formatted for systemd's `STATUS=`.
pub async fn status_line(store: &Store) -> String {
    let now = now_ms();
    let mut parts = Vec::new();
    for queue in QueueName::ALL {
        if let Ok(c) = store.counts(queue, now).await {
            parts.push(format!(
                "{}: {} pending, {} running, {} done, {} failed",
                queue.as_str(),
                c.count("pending"),
                c.count("running"),
                c.count("done"),
                c.count("failed")
            ));
        }
    }
    parts.join("; ")
}

/// Sets the depth, age and pause gauges from the database.
pub async fn refresh_gauges(store: &Store) {
    let now = now_ms();
    for queue in QueueName::ALL {
        let Ok(counts) = store.counts(queue, now).await else {
            continue;
        };
        for status in [
            "pending",
            "running",
            "done",
            "failed",
            "rejected",
            "cancelled",
        ] {
            metrics::gauge!("invoice_worker_queue_depth", "queue" => queue.as_str(), "status" => status)
                .set(counts.count(status) as f64);
        }
        metrics::gauge!("invoice_worker_oldest_pending_age_seconds", "queue" => queue.as_str())
            .set(counts.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
    }
    if let Ok(pauses) = store.pauses().await {
        for queue in QueueName::ALL {
            let active = |whole: bool| {
                pauses
                    .iter()
                    .filter(|p| {
                        p.queue == queue.as_str()
                            && (p.scope == "*") == whole
                            && (p.until_at > now || p.probe_row_id.is_some())
                    })
                    .count() as f64
            };
            metrics::gauge!("invoice_worker_paused_sellers", "queue" => queue.as_str())
                .set(active(false));
            metrics::gauge!("invoice_worker_queue_paused", "queue" => queue.as_str())
                .set(active(true));
        }
    }
}
