//! The monitors that raise alerts no single state change raises: a digest of rows that
//! failed for good, and a queue whose oldest due row has waited too long (and its
//! recovery). Each daemon runs them; the store makes sure each alert is raised once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::AlertingConfig;
use crate::store::driver::AlertStore as _;
use crate::store::{Database, QueueName};

/// How often the monitors look: often enough for the shorter of the two settings, at
/// least every 30 s, never more than twice a second.
pub fn tick(settings: &AlertingConfig) -> Duration {
    (settings.digest_every.min(settings.stuck_after) / 4)
        .clamp(Duration::from_millis(500), Duration::from_secs(30))
}

/// One look at `queues`: raises what is due. Errors are logged; the next look retries.
pub async fn look(store: &Database, queues: &[QueueName], settings: &AlertingConfig, now: i64) {
    for &queue in queues {
        match store.digest_failed(queue, now, settings.digest_every).await {
            Ok(Some(event)) => {
                tracing::info!(
                    queue = queue.as_str(),
                    count = event.count,
                    "alert raised: rows failed"
                )
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(queue = queue.as_str(), error = %e, "failed-rows digest skipped")
            }
        }
        match store.watch_stuck(queue, now, settings.stuck_after).await {
            Ok(Some(event)) => tracing::warn!(
                queue = queue.as_str(),
                event = event.event.as_str(),
                "alert raised"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(queue = queue.as_str(), error = %e, "stuck-queue check skipped")
            }
        }
    }
}

/// Looks every [`tick`] until `stop`.
pub async fn run(
    store: Database,
    queues: Vec<QueueName>,
    settings: AlertingConfig,
    clock: Clock,
    stop: CancellationToken,
) {
    let every = tick(&settings);
    loop {
        look(&store, &queues, &settings, clock.now_ms()).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_follows_the_shorter_setting_within_bounds() {
        let mut s = AlertingConfig::default();
        assert_eq!(tick(&s), Duration::from_secs(30));
        s.digest_every = Duration::from_secs(8);
        assert_eq!(tick(&s), Duration::from_secs(2));
        s.stuck_after = Duration::from_secs(1);
        assert_eq!(tick(&s), Duration::from_millis(500));
    }
}
