//! Claims wait while a result that starts a pause is on its way to the database. The
//! completer writes results a moment after their call returns; without the gate, a worker
//! whose slot just freed could claim the paused seller's next row (or any row of a queue
//! that was just paused) in that moment, and send it into the answer that paused it.
//! Other daemons cannot know of the pause before it is written; this daemon does.

use tokio::sync::watch;

/// How many pause-starting results this worker has yet to write. Cloning shares it.
#[derive(Debug, Clone)]
pub struct PauseGate {
    unwritten: watch::Sender<usize>,
}

impl Default for PauseGate {
    fn default() -> Self {
        PauseGate {
            unwritten: watch::Sender::new(0),
        }
    }
}

impl PauseGate {
    /// A pause-starting result is on its way: claims wait until the returned guard is
    /// dropped (its result written, or given up on).
    pub fn close(&self) -> Closed {
        self.unwritten.send_modify(|n| *n += 1);
        Closed {
            gate: self.unwritten.clone(),
        }
    }

    /// Whether no pause-starting result is waiting to be written.
    pub fn is_open(&self) -> bool {
        *self.unwritten.borrow() == 0
    }

    /// Waits until every pause-starting result so far is written.
    pub async fn opened(&self) {
        let mut seen = self.unwritten.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = seen.wait_for(|n| *n == 0).await;
    }
}

/// Keeps the gate closed for one unwritten pause-starting result.
#[derive(Debug)]
pub struct Closed {
    gate: watch::Sender<usize>,
}

impl Drop for Closed {
    fn drop(&mut self) {
        self.gate.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn claims_wait_until_every_pause_is_written() {
        let gate = PauseGate::default();
        assert!(gate.is_open());
        let first = gate.close();
        let second = gate.clone().close();
        assert!(!gate.is_open());
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.opened().await }
        });
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one pause is still unwritten");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the gate opens once both are written")
            .expect("waiter");
        assert!(gate.is_open());
    }
}
