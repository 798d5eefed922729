//! What the worker does with a row after one attempt.

use std::time::Duration;

/// The single decision every answer (or failure to get one) is turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The row is finished; the outcome (`accepted`, `issued`, `in_progress`, `sent`) is stored.
    Done(Outcome),
    /// Try again later; `after` overrides the backoff (a `Retry-After`, the daily cap).
    Retry {
        /// A delay the server asked for, or a rule's fixed delay.
        after: Option<Duration>,
    },
    /// The seller (tax number) must act; hold all its rows for this long.
    PauseSeller(Duration),
    /// The whole queue is misconfigured or out of quota; hold every row for this long.
    PauseQueue(Duration),
    /// A permanent error: the row becomes `failed` now.
    Fail,
    /// The remote side accepted the work but its result is not known yet: the row stays
    /// pending with `outcome` saying what was seen, and is asked again at `at` (ms). The
    /// check is not the row's failure, so it uses up none of its attempts.
    AwaitConfirmation {
        /// What the last answer said (`accepted`, `in_progress`, `issued` without values).
        outcome: Outcome,
        /// When the first acceptance was seen (ms).
        since: i64,
        /// When to ask again (ms); the per-day cap may push it later.
        at: i64,
    },
}

/// The outcome recorded in a `done` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// rebill code 0: the gateway accepted the retry and will push the result later.
    Accepted,
    /// rebill code 100 or "already generated": the invoice exists.
    Issued,
    /// Nuonuo says invoicing (or a retry) is already under way.
    InProgress,
    /// title: 开票精灵 received the title.
    Sent,
}

impl Outcome {
    /// The value stored in the `outcome` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Issued => "issued",
            Outcome::InProgress => "in_progress",
            Outcome::Sent => "sent",
        }
    }

    /// Parses a stored or configured outcome name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accepted" => Some(Outcome::Accepted),
            "issued" => Some(Outcome::Issued),
            "in_progress" => Some(Outcome::InProgress),
            "sent" => Some(Outcome::Sent),
            _ => None,
        }
    }
}

impl Action {
    /// A short name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Done(_) => "done",
            Action::Retry { .. } => "retry",
            Action::PauseSeller(_) => "pause_seller",
            Action::PauseQueue(_) => "pause_queue",
            Action::Fail => "fail",
            Action::AwaitConfirmation { .. } => "await_confirmation",
        }
    }
}

/// Everything one attempt produced: the decision plus what to record in the row and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted {
    /// What to do with the row.
    pub action: Action,
    /// The HTTP status, when an answer arrived.
    pub http_status: Option<u16>,
    /// The remote code (`code`, `REPLYCODE`), when one was parsed.
    pub code: Option<String>,
    /// A human-readable reason, stored as `last_message`. Never contains a secret.
    pub message: String,
    /// rebill code 100: the invoice number.
    pub invoice_no: Option<String>,
    /// rebill code 100: the PDF URL.
    pub invoice_down_url: Option<String>,
}

impl Attempted {
    /// An attempt that produced no usable answer (timeout, reset, 5xx, garbage): retry.
    pub fn transient(http_status: Option<u16>, message: impl Into<String>) -> Self {
        Attempted {
            action: Action::Retry { after: None },
            http_status,
            code: None,
            message: message.into(),
            invoice_no: None,
            invoice_down_url: None,
        }
    }
}
