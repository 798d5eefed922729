//! Housekeeping: delete finished rows past their retention in short batches, checkpoint the
//! WAL, refresh planner statistics. Run on a cron schedule by the daemon.

use std::time::Duration;

use tokio_cron_scheduler::{Job, JobSchedulerError};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::HousekeepingConfig;
use crate::store::driver::PruneParams;
use crate::store::driver::{AlertStore as _, InspectStore as _, QueueStore as _};
use crate::store::{Database, QueueName, StoreError};

/// When housekeeping runs next, from a cron expression. tokio-cron-scheduler parses the
/// expression and computes the next time (a `Job`'s next tick); its `JobScheduler` is not
/// run, because its ticker wakes every 500 ms, which alone would cost an idle daemon more
/// than half a percent of a core. The caller sleeps until the computed time instead.
pub struct Schedule {
    expression: String,
}

impl Schedule {
    /// Validates `expression` ("sec min hour day month weekday", UTC).
    pub async fn new(expression: &str) -> Result<Schedule, JobSchedulerError> {
        let schedule = Schedule {
            expression: expression.to_string(),
        };
        schedule.next_tick()?;
        Ok(schedule)
    }

    fn next_tick(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>, JobSchedulerError> {
        let mut job = Job::new_async(self.expression.as_str(), |_, _| Box::pin(async {}))?;
        Ok(job.job_data()?.next_tick_utc())
    }

    /// Time until the next run on `clock` (an hour when the expression has no future
    /// time), and that run's scheduled time (epoch ms: the run's name across daemons).
    pub async fn until_next(
        &mut self,
        clock: &Clock,
    ) -> Result<(Duration, i64), JobSchedulerError> {
        Ok(match self.next_tick()? {
            Some(at) => (
                (at - clock.now_utc()).to_std().unwrap_or(Duration::ZERO),
                at.timestamp_millis(),
            ),
            None => (Duration::from_secs(3600), clock.now_ms() + 3_600_000),
        })
    }
}

/// Runs housekeeping at every time of `schedule` until `stop`. Daemons sharing a
/// PostgreSQL database make one run per scheduled time between them (`instance` names
/// this one); each daemon on a SQLite file makes its own.
pub async fn run_on_schedule(
    mut schedule: Schedule,
    store: Database,
    cfg: HousekeepingConfig,
    clock: Clock,
    instance: String,
    stop: CancellationToken,
) {
    loop {
        let (wait, slot) = match schedule.until_next(&clock).await {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "housekeeping schedule failed; trying again in an hour");
                (Duration::from_secs(3600), clock.now_ms() + 3_600_000)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let turn = match store.housekeeping_turn(slot, &instance).await {
            Ok(Some(turn)) => turn,
            Ok(None) => {
                tracing::debug!(slot, "housekeeping run made by another daemon");
                tokio::time::sleep(Duration::from_millis(1100)).await;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "housekeeping failed: cannot take the run");
                tokio::time::sleep(Duration::from_millis(1100)).await;
                continue;
            }
        };
        match run_once(&store, &cfg, clock.now_ms()).await {
            Ok(report) => tracing::info!(
                done_deleted = report.done_deleted,
                failed_deleted = report.failed_deleted,
                alerts_deleted = report.alerts_deleted,
                minutes_deleted = report.minutes_deleted,
                "housekeeping done"
            ),
            Err(e) => tracing::error!(error = %e, "housekeeping failed"),
        }
        if let Err(e) = turn.finish().await {
            tracing::warn!(error = %e, "housekeeping run made, but not recorded as made");
        }
        // Never twice for the same scheduled second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}

/// What one housekeeping pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `done` rows deleted.
    pub done_deleted: u64,
    /// `failed`, `rejected` and `cancelled` rows deleted.
    pub failed_deleted: u64,
    /// Delivered or given-up alerts deleted (kept as long as `done` rows).
    pub alerts_deleted: u64,
    /// Per-minute attempt counts deleted (kept a day: the console charts the last hour).
    pub minutes_deleted: u64,
}

/// How long the per-minute attempt counts are kept.
const MINUTES_KEPT: Duration = Duration::from_secs(86_400);

/// Runs one pass with `now` (ms) as the current time.
pub async fn run_once(
    store: &Database,
    cfg: &HousekeepingConfig,
    now: i64,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let done_before = now - cfg.done_retention.as_millis() as i64;
    let failed_before = now - cfg.failed_retention.as_millis() as i64;
    for queue in QueueName::ALL {
        let batch = |statuses: &'static [&'static str], finished_before| PruneParams {
            queue,
            statuses,
            finished_before,
            batch: cfg.batch_size,
            now,
        };
        report.done_deleted += prune(store, batch(&["done"], done_before)).await?;
        report.failed_deleted += prune(
            store,
            batch(&["failed", "rejected", "cancelled"], failed_before),
        )
        .await?;
    }
    loop {
        let deleted = store.prune_alerts(done_before, cfg.batch_size, now).await?;
        report.alerts_deleted += deleted;
        if deleted == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report.minutes_deleted = store
        .prune_minutes(now - MINUTES_KEPT.as_millis() as i64)
        .await?;
    store.prune_orphaned_history().await?;
    store.checkpoint().await?;
    store.optimize().await?;
    Ok(report)
}

async fn prune(store: &Database, params: PruneParams<'_>) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let deleted = store.prune_batch(params).await?;
        total += deleted;
        if deleted == 0 {
            return Ok(total);
        }
        // Let writers in other processes take the lock between batches.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    #[tokio::test]
    async fn schedule_gives_the_time_to_the_next_run() {
        let mut every_second = Schedule::new("* * * * * *").await.expect("valid");
        let clock = Clock::system();
        assert!(every_second.until_next(&clock).await.expect("next").0 <= Duration::from_secs(1));
        let mut daily = Schedule::new("0 17 19 * * *").await.expect("valid");
        let (wait, _) = daily.until_next(&clock).await.expect("next");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(86_400),
            "{wait:?}"
        );
        assert!(Schedule::new("every day").await.is_err());
    }

    #[tokio::test]
    async fn runs_on_schedule_until_stopped() {
        let (_d, store) = temp_store().await;
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num, status, finished_at) VALUES ('old', 'T', 'done', 0)")
            .execute(store.pool())
            .await
            .expect("insert");
        let stop = CancellationToken::new();
        let schedule = Schedule::new("* * * * * *").await.expect("valid");
        let task = tokio::spawn(run_on_schedule(
            schedule,
            store.clone().into(),
            HousekeepingConfig::default(),
            Clock::system(),
            "test".to_string(),
            stop.clone(),
        ));
        let started = std::time::Instant::now();
        loop {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM rebill_orders")
                .fetch_one(store.pool())
                .await
                .expect("count");
            if n == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "housekeeping did not run"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        task.await.expect("stops");
    }

    const DAY: i64 = 86_400_000;

    #[tokio::test]
    async fn deletes_only_rows_past_their_retention() {
        let (_d, store) = temp_store().await;
        let now = 1_000 * DAY;
        for (orderno, status, finished) in [
            ("old-done", "done", now - 31 * DAY),
            ("new-done", "done", now - 29 * DAY),
            ("old-failed", "failed", now - 181 * DAY),
            ("mid-failed", "failed", now - 100 * DAY),
            ("old-rejected", "rejected", now - 200 * DAY),
        ] {
            sqlx::query("INSERT INTO rebill_orders (orderno, tax_num, status, finished_at) VALUES (?1, 'T', ?2, ?3)")
                .bind(orderno)
                .bind(status)
                .bind(finished)
                .execute(store.pool())
                .await
                .expect("insert");
        }
        sqlx::query("INSERT INTO rebill_orders (orderno, tax_num) VALUES ('pending', 'T')")
            .execute(store.pool())
            .await
            .expect("insert");
        let cfg = HousekeepingConfig {
            batch_size: 1,
            ..HousekeepingConfig::default()
        };
        let report = run_once(&store.clone().into(), &cfg, now)
            .await
            .expect("housekeeping");
        assert_eq!(
            report,
            Report {
                done_deleted: 1,
                failed_deleted: 2,
                alerts_deleted: 0,
                minutes_deleted: 0,
            }
        );
        let left: Vec<(String,)> =
            sqlx::query_as("SELECT orderno FROM rebill_orders ORDER BY orderno")
                .fetch_all(store.pool())
                .await
                .expect("rows");
        let left: Vec<String> = left.into_iter().map(|(o,)| o).collect();
        assert_eq!(left, ["mid-failed", "new-done", "pending"]);
    }
}
