//! Delivering the outbox: claim due alerts under a lease, post each to every target that
//! wants it and lacks it, and record the round — delivered, retried with backoff, or
//! given up after `give_up_after`. Targets are rate limited one by one; a target that
//! fails for longer than `report_failing_after` is logged (and `status` shows it).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Event, PostError, Poster};
use crate::clock::Clock;
use crate::config::{AlertTarget, AlertingConfig};
use crate::store::driver::AlertStore as _;
use crate::store::outbox::{AlertDelivery, ClaimedAlert};
use crate::store::Database;

/// How long a claimed alert is kept from other deliverers while its posts run.
const LEASE: Duration = Duration::from_secs(60);
/// Alerts claimed per round.
const BATCH: u32 = 16;
/// The longest wait between two delivery rounds of one alert.
const MAX_BACKOFF_MS: i64 = 5 * 60_000;
/// Looked at this often even without a wake-up (another host's insert on a file system
/// without change notifications).
const FALLBACK_POLL: Duration = Duration::from_secs(30);
/// At most one look per this interval however busy the database is.
const MIN_GAP: Duration = Duration::from_millis(250);

/// One target and its limiter.
struct Target {
    config: AlertTarget,
    limiter: DefaultDirectRateLimiter,
}

/// Posts outbox alerts to the configured targets.
pub struct Deliverer {
    store: Database,
    poster: Poster,
    targets: Vec<Target>,
    settings: AlertingConfig,
    clock: Clock,
    token: String,
    /// Per target: since when it has failed, and whether that was reported.
    failing: HashMap<String, (i64, bool)>,
}

/// How one alert fared in one round.
#[derive(Debug, Default)]
struct Round {
    delivered: Vec<String>,
    errors: Vec<String>,
    /// A target's rate limit held it back: no failure, just later.
    deferred: Option<Duration>,
}

impl Deliverer {
    /// A deliverer to `targets` through `store`'s outbox.
    pub fn new(
        store: Database,
        targets: Vec<AlertTarget>,
        settings: AlertingConfig,
        clock: Clock,
        instance: &str,
    ) -> reqwest::Result<Deliverer> {
        let poster = Poster::new(Duration::from_secs(10))?;
        let targets = targets
            .into_iter()
            .map(|config| {
                let per_minute = NonZeroU32::new(config.rate_per_minute).unwrap_or(NonZeroU32::MIN);
                Target {
                    limiter: RateLimiter::direct(Quota::per_minute(per_minute)),
                    config,
                }
            })
            .collect();
        Ok(Deliverer {
            store,
            poster,
            targets,
            settings,
            clock,
            token: format!("{instance}-alerts-{}", uuid::Uuid::new_v4()),
            failing: HashMap::new(),
        })
    }

    /// Delivers until `stop`: a round whenever alerts are due, woken by commits (`wake`),
    /// the next due time, or the fallback poll.
    pub async fn run(mut self, mut wake: watch::Receiver<u64>, stop: CancellationToken) {
        loop {
            // A read first: most wake-ups are other commits, and a claim takes the write lock.
            let next = match self.store.next_alert_due(self.clock.now_ms()).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "alert outbox unreadable; retrying");
                    None
                }
            };
            if next.is_some_and(|at| at <= self.clock.now_ms()) {
                match self.round().await {
                    Ok(n) if n > 0 => continue,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "alert delivery round failed; retrying"),
                }
            }
            let wait = next
                .map(|at| Duration::from_millis((at - self.clock.now_ms()).max(0) as u64))
                .unwrap_or(FALLBACK_POLL)
                .clamp(MIN_GAP, FALLBACK_POLL);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                changed = wake.changed() => {
                    if changed.is_err() {
                        // The watcher stopped (shutdown): poll on the fallback instead.
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(MIN_GAP) => {}
                    }
                }
            }
        }
    }

    /// Claims and delivers one batch; how many alerts it claimed.
    pub async fn round(&mut self) -> Result<usize, crate::store::StoreError> {
        let now = self.clock.now_ms();
        let claimed = self
            .store
            .claim_alerts(now, LEASE, &self.token, BATCH)
            .await?;
        for alert in &claimed {
            self.deliver(alert).await?;
        }
        Ok(claimed.len())
    }

    async fn deliver(&mut self, alert: &ClaimedAlert) -> Result<(), crate::store::StoreError> {
        let event: Event = match serde_json::from_str(&alert.body) {
            Ok(event) => event,
            Err(e) => {
                let error = format!("alert {} unreadable: {e}", alert.id);
                tracing::error!(alert_id = alert.id, %error, "alert dropped");
                let result = AlertDelivery::GiveUp { error };
                let now = self.clock.now_ms();
                self.store
                    .finish_alert(alert.id, &self.token, &[], &result, now)
                    .await?;
                return Ok(());
            }
        };
        let mut round = Round {
            delivered: alert.delivered(),
            ..Round::default()
        };
        for i in 0..self.targets.len() {
            let target = &self.targets[i];
            let name = target.config.name.clone();
            if !target.config.wants(event.event) || round.delivered.contains(&name) {
                continue;
            }
            if let Err(not_until) = target.limiter.check() {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                round.deferred = Some(round.deferred.map_or(wait, |w| w.max(wait)));
                continue;
            }
            let result = self
                .poster
                .post(&target.config, &event, self.clock.now_ms())
                .await;
            let now = self.clock.now_ms();
            match result {
                Ok(()) => {
                    round.delivered.push(name.clone());
                    self.target_ok(&name, now).await;
                }
                Err(e) => {
                    round.errors.push(format!("{name}: {e}"));
                    self.target_failed(&name, &e, now).await;
                }
            }
        }
        let now = self.clock.now_ms();
        let result = self.outcome(alert, &round, now);
        match &result {
            AlertDelivery::Delivered => {
                tracing::info!(alert_id = alert.id, event = %alert.event, targets = round.delivered.len(), "alert delivered")
            }
            AlertDelivery::GiveUp { error } => tracing::error!(
                alert_id = alert.id, event = %alert.event, attempts = alert.attempts, %error,
                "alert given up after {}: some target never took it",
                humantime::format_duration(self.settings.give_up_after)
            ),
            AlertDelivery::Retry { .. } => {}
        }
        if !self
            .store
            .finish_alert(alert.id, &self.token, &round.delivered, &result, now)
            .await?
        {
            tracing::warn!(
                alert_id = alert.id,
                "alert's lease ran out during delivery; another deliverer has it"
            );
        }
        Ok(())
    }

    /// What the round means for the alert.
    fn outcome(&self, alert: &ClaimedAlert, round: &Round, now: i64) -> AlertDelivery {
        if round.errors.is_empty() && round.deferred.is_none() {
            return AlertDelivery::Delivered;
        }
        let give_up_at = alert.created_at + self.settings.give_up_after.as_millis() as i64;
        if !round.errors.is_empty() && now >= give_up_at {
            return AlertDelivery::GiveUp {
                error: round.errors.join("; "),
            };
        }
        let at = if round.errors.is_empty() {
            // Only held back by a rate limit: as soon as it allows.
            now + round
                .deferred
                .map_or(1000, |d| d.as_millis() as i64)
                .max(100)
        } else {
            now + backoff_ms(self.settings.retry_delay, alert.attempts)
        };
        AlertDelivery::Retry {
            at,
            error: if round.errors.is_empty() {
                "rate limited".to_string()
            } else {
                round.errors.join("; ")
            },
        }
    }

    async fn target_ok(&mut self, name: &str, now: i64) {
        metrics::counter!("invoice_worker_alert_posts_total", "target" => name.to_string(), "result" => "ok")
            .increment(1);
        if let Some((since, reported)) = self.failing.remove(name) {
            if reported {
                tracing::info!(target = name, failed_for = %humantime::format_duration(Duration::from_millis((now - since).max(0) as u64 / 1000 * 1000)), "alert target works again");
            }
        }
        if let Err(e) = self.store.record_target(name, None, now).await {
            tracing::warn!(target = name, error = %e, "cannot record alert target health");
        }
    }

    async fn target_failed(&mut self, name: &str, error: &PostError, now: i64) {
        metrics::counter!("invoice_worker_alert_posts_total", "target" => name.to_string(), "result" => "failed")
            .increment(1);
        let entry = self.failing.entry(name.to_string()).or_insert((now, false));
        let report_after = self.settings.report_failing_after.as_millis() as i64;
        if !entry.1 && now - entry.0 >= report_after {
            entry.1 = true;
            let hint = if error.is_permanent_status() {
                " (the robot's URL seems gone: check its key)"
            } else {
                ""
            };
            tracing::error!(target = name, %error, failing_for = %humantime::format_duration(Duration::from_millis(report_after as u64)),
                "alert target keeps failing{hint}; alerts wait in the outbox");
        } else {
            tracing::warn!(target = name, %error, "alert post failed; will retry");
        }
        let text = error.to_string();
        if let Err(e) = self.store.record_target(name, Some(&text), now).await {
            tracing::warn!(target = name, error = %e, "cannot record alert target health");
        }
    }
}

/// The wait after the `attempts`-th failed round: `first`, doubled each round.
fn backoff_ms(first: Duration, attempts: i64) -> i64 {
    let doublings = attempts.clamp(1, 20) - 1;
    (first.as_millis() as i64)
        .saturating_mul(1_i64 << doublings.min(16))
        .min(MAX_BACKOFF_MS)
}

/// Sends one test message to each target now, outside the outbox
/// (`invoice-worker alert test`): each target's name and what happened.
pub async fn send_test(
    targets: &[AlertTarget],
    instance: &str,
    now: i64,
) -> Vec<(String, Result<(), PostError>)> {
    let poster = match Poster::new(Duration::from_secs(10)) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let error = PostError::Transport(crate::clients::http::TransportError::Other(format!(
                "cannot build the HTTP client: {}",
                e.without_url()
            )));
            return targets
                .iter()
                .map(|t| (t.name.clone(), Err(error.clone())))
                .collect();
        }
    };
    let mut event = Event::new(super::EventKind::Test, "", now);
    event.reason = Some(format!("invoice-worker alert test from {instance}"));
    let mut results = Vec::new();
    for target in targets {
        results.push((target.name.clone(), poster.post(target, &event, now).await));
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::EventKind;
    use crate::config::AlertKind;
    use crate::secret::Secret;
    use crate::sim::{SimOptions, Simulator};
    use crate::store::test_support::temp_store;
    use crate::store::Store;

    fn wecom(sim: &Simulator, key: &str, per_minute: u32) -> AlertTarget {
        AlertTarget {
            name: "ops".into(),
            kind: AlertKind::Wecom,
            url: Secret::new(sim.wecom_url(key)),
            secret: None,
            events: None,
            rate_per_minute: per_minute,
        }
    }

    async fn statuses(store: &Store) -> Vec<(String, Option<String>)> {
        sqlx::query_as("SELECT status, last_error FROM alert_outbox ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_rate_limited_target_gets_the_rest_later_without_a_failure() {
        let sim = Simulator::start(SimOptions::default()).await.unwrap();
        let (_db, store) = temp_store().await;
        let clock = Clock::manual(1_000_000);
        for at in [999_999, 1_000_000] {
            store
                .raise_alert(&Event::new(EventKind::Test, "", at))
                .await
                .unwrap();
        }
        let targets = vec![wecom(&sim, "limited", 1)];
        let mut d = Deliverer::new(
            store.clone().into(),
            targets,
            AlertingConfig::default(),
            clock,
            "t",
        )
        .unwrap();
        assert_eq!(d.round().await.unwrap(), 2);
        assert_eq!(sim.robot_messages().len(), 1, "one message a minute");
        let s = statuses(&store).await;
        assert_eq!(s[0].0, "delivered");
        assert_eq!(
            (s[1].0.as_str(), s[1].1.as_deref()),
            ("pending", Some("rate limited"))
        );
        // Held back, not failed: the target is healthy.
        let report = store.alert_report().await.unwrap();
        assert!(report.targets[0].failing_since.is_none(), "{report:?}");
    }

    #[tokio::test]
    async fn an_unreadable_alert_and_one_refused_for_too_long_are_given_up() {
        let sim = Simulator::start(SimOptions::default()).await.unwrap();
        sim.script_robot("down", vec![crate::sim::RobotBehavior::Status(404)]);
        let (_db, store) = temp_store().await;
        sqlx::query("INSERT INTO alert_outbox (event, body, created_at, next_attempt_at) VALUES ('seller_paused', '{not json', 0, 0)")
            .execute(store.pool())
            .await
            .unwrap();
        let clock = Clock::manual(1_000);
        store
            .raise_alert(&Event::new(EventKind::Test, "", 1_000))
            .await
            .unwrap();
        let settings = AlertingConfig::default();
        let day = settings.give_up_after;
        let targets = vec![wecom(&sim, "down", 600)];
        let mut d =
            Deliverer::new(store.clone().into(), targets, settings, clock.clone(), "t").unwrap();
        assert_eq!(d.round().await.unwrap(), 2);
        let s = statuses(&store).await;
        assert_eq!(s[0].0, "given_up");
        assert!(
            s[0].1.as_deref().is_some_and(|e| e.contains("unreadable")),
            "{s:?}"
        );
        assert_eq!(s[1].0, "pending");
        assert!(
            s[1].1.as_deref().is_some_and(|e| e.contains("404")),
            "{s:?}"
        );
        clock.advance(day);
        assert_eq!(d.round().await.unwrap(), 1);
        assert_eq!(statuses(&store).await[1].0, "given_up");
        let report = store.alert_report().await.unwrap();
        assert_eq!((report.pending, report.given_up), (0, 2));
        assert!(report.targets[0].failing_since.is_some());
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let first = Duration::from_secs(5);
        assert_eq!(backoff_ms(first, 1), 5_000);
        assert_eq!(backoff_ms(first, 2), 10_000);
        assert_eq!(backoff_ms(first, 4), 40_000);
        assert_eq!(backoff_ms(first, 7), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(first, 1000), MAX_BACKOFF_MS);
    }
}
