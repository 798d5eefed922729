//! What an alert is about: one [`Event`], stored in the outbox as JSON and posted to every
//! target that wants its [`EventKind`].

use serde::{Deserialize, Serialize};

/// The kinds of event a person is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A seller was paused for a reason only a person can fix (SMS login, 实人认证, …).
    SellerPaused,
    /// A whole queue was paused (credentials refused, quota exhausted).
    QueuePaused,
    /// A pause ended: its probe went through, an operator resumed it, or no row was left.
    PauseLifted,
    /// Rows became `failed` (a digest of those since the last one).
    RowsFailed,
    /// The oldest due pending row of a queue has waited longer than `stuck_after`.
    QueueStuck,
    /// A queue reported stuck moves again.
    QueueRecovered,
    /// `invoice-worker alert test`.
    Test,
}

impl EventKind {
    /// Every kind, in the order the README lists them.
    pub const ALL: [EventKind; 7] = [
        EventKind::SellerPaused,
        EventKind::QueuePaused,
        EventKind::PauseLifted,
        EventKind::RowsFailed,
        EventKind::QueueStuck,
        EventKind::QueueRecovered,
        EventKind::Test,
    ];

    /// The name used in config (`events = [...]`), the outbox and the webhook's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SellerPaused => "seller_paused",
            EventKind::QueuePaused => "queue_paused",
            EventKind::PauseLifted => "pause_lifted",
            EventKind::RowsFailed => "rows_failed",
            EventKind::QueueStuck => "queue_stuck",
            EventKind::QueueRecovered => "queue_recovered",
            EventKind::Test => "test",
        }
    }

    /// Parses a name written by [`EventKind::as_str`].
    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One failed row named in a [`EventKind::RowsFailed`] digest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FailedRow {
    /// The row's id (`invoice-worker show --queue Q ID`, `retry`).
    pub id: i64,
    /// Its order number (`orderno` / `order_no`).
    pub order: String,
    /// Its seller (tax number or 授权码).
    pub seller: String,
    /// Its `last_message`.
    pub message: String,
}

/// Something a person should hear about. One flat shape for every kind, so that a webhook
/// consumer reads the same fields whatever the event; fields a kind does not use are absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Event {
    /// What happened.
    pub event: EventKind,
    /// The queue (`rebill`, `title`); empty for a test message.
    pub queue: String,
    /// The paused or resumed scope: a seller's tax number (rebill), a 授权码 (title), or
    /// `*` for the whole queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Why: the platform's own message for a pause, how a pause ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When a pause ends unless lifted earlier (epoch ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// How many rows: failed since the last digest, or pending in a stuck queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    /// Since when (epoch ms): the digest's window start, or when the oldest due row of a
    /// stuck queue fell due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// A few of the rows a digest is about (at most [`MAX_EXAMPLES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<FailedRow>,
    /// When the event happened (epoch ms).
    pub at: i64,
}

/// The most failed rows a digest names; `count` says how many there were.
pub const MAX_EXAMPLES: usize = 5;

impl Event {
    /// An event of `kind` on `queue` at `at`, with no other field set.
    pub fn new(event: EventKind, queue: &str, at: i64) -> Event {
        Event {
            event,
            queue: queue.to_string(),
            scope: None,
            reason: None,
            until: None,
            count: None,
            since: None,
            rows: Vec::new(),
            at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names_and_serde() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        assert_eq!(EventKind::parse("seller-paused"), None);
    }

    #[test]
    fn unused_fields_are_absent_from_the_json() {
        let mut e = Event::new(EventKind::SellerPaused, "rebill", 1_700_000_000_000);
        e.scope = Some("91310117568051222X".into());
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event"], "seller_paused");
        assert!(json.get("count").is_none() && json.get("rows").is_none());
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }
}
