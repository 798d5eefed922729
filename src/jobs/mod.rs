//! The two queues' handlers: what "process one row" means for rebilling and for titles.
//! Each validates its row, prepares it, sends it through its client and classifies what
//! came back (`classify.rs` next to each handler holds the queue's built-in rules).

pub mod rebill;
pub mod title;

use crate::queue::rules::{MessageRule, PauseDefaults};

/// How a queue turns answers into actions besides its built-in rules.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The operator's `message contains → action` rules, checked before the built-in ones.
    pub operator: Vec<MessageRule>,
    /// Pause lengths for rules without `after` and for the built-in pauses.
    pub pauses: PauseDefaults,
}
