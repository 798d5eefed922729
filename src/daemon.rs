//! Wires config, store, clients and queues together and runs them until told to stop;
//! speaks the systemd notify protocol (READY, WATCHDOG, STATUS, STOPPING).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::alerts::Deliverer;
use crate::clients::rebill::{RebillClient, RebillSettings};
use crate::clients::title::{TitleClient, TitleSettings};
use crate::clock::Clock;
use crate::config::{check_endpoint, Config};
use crate::jobs::rebill::RebillJob;
use crate::jobs::title::{TitleDefaults, TitleJob};
use crate::jobs::Rules;
use crate::ops::{self, Health};
use crate::queue::backoff::Backoff;
use crate::queue::heartbeat::{Heartbeat, WriteHealth};
use crate::queue::housekeeping;
use crate::queue::rules::PauseDefaults;
use crate::queue::worker::{Handler, Worker, WorkerSettings};
use crate::store::{Database, QueueName};

/// How often queue depths are pushed to systemd's `STATUS=` and the gauges.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// A unique name for this daemon process, recorded with its claims.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let short: String = uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(8)
        .collect();
    format!("{}:{}:{}", host.trim(), std::process::id(), short)
}

fn pauses_of(limits: &crate::config::LimitsConfig) -> PauseDefaults {
    PauseDefaults {
        seller: limits.seller_pause,
        queue: limits.queue_pause,
    }
}

fn settings_of(
    config: &Config,
    instance: &str,
    limits: &crate::config::LimitsConfig,
    clock: &Clock,
) -> WorkerSettings {
    WorkerSettings {
        instance: instance.to_string(),
        lease: config.worker.lease,
        claim_batch: config.worker.claim_batch,
        max_in_flight: limits.max_in_flight,
        rate_per_second: limits.rate_per_second,
        shutdown_grace: config.worker.shutdown_grace,
        backoff: Backoff::from(&config.retry),
        clock: clock.clone(),
    }
}

/// Builds the rebill handler, or says why the queue is off.
fn rebill_job(config: &Config, clock: &Clock) -> anyhow::Result<Option<RebillJob>> {
    if !config.rebill.enabled {
        tracing::info!("rebill queue disabled by config (rebill.enabled = false)");
        return Ok(None);
    }
    let Some(creds) = config.rebill_credentials()? else {
        tracing::warn!(
            "rebill queue disabled: rebill.appid and rebill.app_secret (or app_secret_file, or ${}) are not both set",
            crate::config::ENV_REBILL_SECRET
        );
        return Ok(None);
    };
    let endpoint = check_endpoint(
        "rebill.endpoint",
        &config.rebill.endpoint,
        config.rebill.allow_insecure_http,
    )?;
    let client = RebillClient::new(RebillSettings {
        endpoint,
        appid: creds.appid,
        app_secret: creds.app_secret,
        timeout: config.rebill.limits.timeout,
    })
    .context("building the rebill HTTP client")?;
    let rules = Rules {
        operator: config.rebill.rules.clone(),
        pauses: pauses_of(&config.rebill.limits),
    };
    let confirm = crate::jobs::rebill::confirm::ConfirmPolicy::from_config(&config.rebill);
    Ok(Some(
        RebillJob::new(client, rules, clock.clone()).confirming(confirm),
    ))
}

/// Builds the title handler, or says why the queue is off.
fn title_job(config: &Config, store: &Database, clock: &Clock) -> anyhow::Result<Option<TitleJob>> {
    let t = &config.title;
    if !t.enabled {
        tracing::info!("title queue disabled by config (title.enabled = false)");
        return Ok(None);
    }
    let Some(creds) = config.title_credentials()? else {
        tracing::warn!(
            "title queue disabled: title.base_url, title.client_id and title.client_secret (or client_secret_file, or ${}) are not all set",
            crate::config::ENV_TITLE_SECRET
        );
        return Ok(None);
    };
    let base = t.base_url.as_deref().unwrap_or_default();
    let base_url = check_endpoint("title.base_url", base, t.allow_insecure_http)?;
    let client = TitleClient::new(TitleSettings {
        base_url,
        client_id: creds.client_id,
        client_secret: creds.client_secret,
        openid: t.openid.clone(),
        busi_type: t.busi_type.clone(),
        token_ttl: t.token_ttl,
        timeout: t.limits.timeout,
    })
    .context("building the title HTTP client")?;
    let defaults = TitleDefaults {
        sqm: t.sqm.clone(),
        data_type: t.data_type,
        ttqqlsh_prefix: t.ttqqlsh_prefix.clone(),
        lenient_tax_id: t.lenient_tax_id,
    };
    let rules = Rules {
        operator: t.rules.clone(),
        pauses: pauses_of(&t.limits),
    };
    Ok(Some(TitleJob::new(
        store.clone(),
        client,
        defaults,
        rules,
        clock.clone(),
    )))
}

/// Runs the daemon on `store` (opened and migrated) until `shutdown` is cancelled, then
/// drains, closes the store and returns; systemd hears READY=1 once the loops run.
pub async fn run_until_stopped(
    config: &Config,
    store: Database,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let result = run_with_store(config, store.clone(), shutdown).await;
    // Bounded: a store that cannot write must not keep a stopping daemon alive.
    if tokio::time::timeout(Duration::from_secs(5), store.close())
        .await
        .is_err()
    {
        tracing::warn!("database connections did not close within 5 s; exiting anyway");
    }
    result
}

/// Like [`run_until_stopped`], on an already opened and migrated store.
pub async fn run_with_store(
    config: &Config,
    store: Database,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Leases, due times and backoff are judged by the wall clock, as the other writers'
    // rows are stamped (on PostgreSQL the store moves them to the database's clock).
    run_on_clock(config, store, shutdown, Clock::system()).await
}

/// Like [`run_with_store`], with the host's time read from `clock` (a skewed one shows
/// that a host's wrong clock changes nothing on PostgreSQL).
pub async fn run_on_clock(
    config: &Config,
    store: Database,
    shutdown: CancellationToken,
    clock: Clock,
) -> anyhow::Result<()> {
    let instance = instance_name();
    let alert_targets = config.alert_targets()?;
    let store = store
        .with_alerts(!alert_targets.is_empty())
        .with_history(config.worker.history);
    let internal_stop = CancellationToken::new();
    let store_services = store
        .start_services(config.worker.poll_interval, internal_stop.clone())
        .await
        .context("opening the commit watcher connection")?;
    let wake = store_services.wake.clone();

    if config.http.listen.is_some() {
        // Installed before the workers start so their first attempts are counted.
        let _ = ops::metrics_handle();
    }
    let mut loops: Vec<(QueueName, Heartbeat)> = Vec::new();
    let mut writers: Vec<(QueueName, WriteHealth)> = Vec::new();
    let mut workers = Vec::new();
    if let Some(job) = rebill_job(config, &clock)? {
        let settings = settings_of(config, &instance, &config.rebill.limits, &clock);
        workers.push(spawn_worker(
            Worker::new(store.clone(), Arc::new(job), settings, wake.clone()),
            (&mut loops, &mut writers),
            &shutdown,
        ));
    }
    if let Some(job) = title_job(config, &store, &clock)? {
        let settings = settings_of(config, &instance, &config.title.limits, &clock);
        workers.push(spawn_worker(
            Worker::new(store.clone(), Arc::new(job), settings, wake.clone()),
            (&mut loops, &mut writers),
            &shutdown,
        ));
    }
    if workers.is_empty() {
        tracing::warn!(
            "no queue is enabled: nothing will be sent until credentials are configured"
        );
    }
    let alerting = if alert_targets.is_empty() {
        Vec::new()
    } else {
        let names: Vec<&str> = alert_targets.iter().map(|t| t.name.as_str()).collect();
        tracing::info!(targets = %names.join(", "), "alerts enabled");
        let deliverer = Deliverer::new(
            store.clone(),
            alert_targets,
            config.alerting.clone(),
            clock.clone(),
            &instance,
        )
        .context("building the alert HTTP client")?;
        let running: Vec<QueueName> = loops.iter().map(|(queue, _)| *queue).collect();
        vec![
            tokio::spawn(deliverer.run(wake.clone(), internal_stop.clone())),
            tokio::spawn(crate::alerts::monitor::run(
                store.clone(),
                running,
                config.alerting.clone(),
                clock.clone(),
                internal_stop.clone(),
            )),
        ]
    };

    let health = Health {
        store: store.clone(),
        loops,
        writers,
        max_age: Duration::from_secs(10),
    };
    // Someone reads the depths (systemd's STATUS=, /metrics, the console): keep them
    // counted.
    let depths = crate::depths::Depths::new();
    let counter = (config.http.listen.is_some() || std::env::var_os("NOTIFY_SOCKET").is_some())
        .then(|| {
            tokio::spawn(
                depths
                    .clone()
                    .run(store.clone(), clock.clone(), internal_stop.clone()),
            )
        });
    let http_task = match config.http.listen {
        Some(addr) => {
            let listener = ops::bind(addr)
                .await
                .with_context(|| format!("binding http.listen {addr}"))?;
            let token = config.console_token()?;
            let mode = if token.is_some() {
                "actions after login"
            } else {
                "read-only"
            };
            tracing::info!(%addr, console = mode, "serving /metrics, /healthz and the console");
            let console = Arc::new(crate::console::Console::new(
                store.clone(),
                depths.clone(),
                token,
                clock.clone(),
                addr,
            ));
            let health = health.clone();
            let stop = internal_stop.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = ops::serve(listener, health, console, stop).await {
                    tracing::error!(error = %e, "metrics server failed");
                }
            }))
        }
        None => None,
    };
    let housekeeper = if config.housekeeping.enabled {
        let next = housekeeping::Schedule::new(&config.housekeeping.schedule)
            .await
            .with_context(|| format!("housekeeping.schedule {:?}", config.housekeeping.schedule))?;
        Some(tokio::spawn(housekeeping::run_on_schedule(
            next,
            store.clone(),
            config.housekeeping.clone(),
            clock.clone(),
            instance.clone(),
            internal_stop.clone(),
        )))
    } else {
        None
    };

    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    tracing::info!(
        instance = %instance,
        backend = store.backend(),
        database = %store.describe(),
        "invoice-worker running"
    );
    let supervisor = tokio::spawn(supervise(
        depths,
        health,
        shutdown.clone(),
        internal_stop.clone(),
    ));

    shutdown.cancelled().await;
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    tracing::info!("shutdown requested: finishing calls in flight");
    let mut failure = None;
    for worker in workers {
        match worker.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure = Some(anyhow::Error::from(e).context("worker failed while stopping"))
            }
            Err(e) => failure = Some(anyhow::anyhow!("worker task ended abnormally: {e}")),
        }
    }
    internal_stop.cancel();
    if let Some(task) = housekeeper {
        let _ = task.await;
    }
    for task in alerting {
        let _ = task.await;
    }
    let _ = supervisor.await;
    if let Some(task) = counter {
        let _ = task.await;
    }
    store_services.join().await;
    if let Some(task) = http_task {
        let _ = task.await;
    }
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// What the watchdog and `/healthz` watch: each loop's heartbeat and write health.
type Watched<'a> = (
    &'a mut Vec<(QueueName, Heartbeat)>,
    &'a mut Vec<(QueueName, WriteHealth)>,
);

fn spawn_worker<H: Handler>(
    worker: Worker<H>,
    (loops, writers): Watched<'_>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), crate::store::StoreError>> {
    let queue = <H::Row as crate::store::rows::QueueRow>::QUEUE;
    loops.push((queue, worker.heartbeat()));
    writers.push((queue, worker.write_health()));
    tokio::spawn(worker.run(shutdown.clone()))
}

/// Watchdog pings while the loops tick, and `STATUS=` with queue depths.
///
/// The ping is decided from the loops' heartbeats alone and never waits for the database:
/// the status line is refreshed by a task of its own, so a starved pool cannot cost a ping.
/// A loop counts as stuck once its heartbeat is older than `WatchdogSec`, at least 5 s and
/// at most `health.max_age` (10 s), so a short `WatchdogSec` really means a quick restart
/// (about twice `WatchdogSec` after the hang) instead of always 10 s plus `WatchdogSec`.
async fn supervise(
    depths: crate::depths::Depths,
    mut health: Health,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        // Not under systemd: nobody to tell.
        return;
    }
    let stuck = Arc::new(AtomicBool::new(false));
    let refresh = Arc::new(tokio::sync::Notify::new());
    let status = tokio::spawn({
        let (stuck, refresh, stop) = (stuck.clone(), refresh.clone(), stop.clone());
        async move {
            loop {
                // The counter task keeps the figures; this only reads its latest.
                let line = crate::depths::status_line(&depths.latest());
                if !stuck.load(Ordering::Relaxed) && !line.is_empty() {
                    let _ = sd_notify::notify(false, &[NotifyState::Status(&line)]);
                }
                tokio::select! {
                    _ = tokio::time::sleep(STATUS_EVERY) => {}
                    _ = refresh.notified() => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    });
    let Some(watchdog) = ops::watchdog_interval() else {
        stop.cancelled().await;
        let _ = status.await;
        return;
    };
    health.max_age = ops::watchdog_stuck_after(watchdog, health.max_age);
    let tick = (watchdog / 2)
        .min(STATUS_EVERY)
        .max(Duration::from_millis(100));
    tracing::info!(watchdog = ?watchdog, ping_every = ?tick, stuck_after = ?health.max_age, "systemd watchdog enabled");
    loop {
        if shutdown.is_cancelled() {
            // Draining: the loops stopped on purpose and systemd disarmed the watchdog at
            // STOPPING=1, so there is nothing left to judge.
            break;
        }
        match health.loops_fresh() {
            Ok(()) => {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                if stuck.swap(false, Ordering::Relaxed) {
                    tracing::warn!("worker loops tick again: watchdog pings resumed");
                    refresh.notify_one();
                }
            }
            // No ping: systemd kills and restarts a daemon whose loops are stuck.
            Err(reason) => {
                if !stuck.swap(true, Ordering::Relaxed) {
                    tracing::error!(%reason, "worker loop stuck: withholding watchdog pings");
                    let line = format!("stuck, watchdog pings withheld: {reason}");
                    let _ = sd_notify::notify(false, &[NotifyState::Status(&line)]);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.cancelled() => break,
        }
    }
    let _ = status.await;
}
