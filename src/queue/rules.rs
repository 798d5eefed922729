//! Operator-defined classification rules: `message contains → action`, checked before the
//! built-in rules of each queue.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::action::{Action, Outcome};

/// One `[[rebill.rules]]` / `[[title.rules]]` entry from `worker.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRule {
    /// A substring of the server's message (case-sensitive; Chinese text has no case).
    pub contains: String,
    /// `retry`, `fail`, `pause_seller`, `pause_queue`, or `done:<outcome>`
    /// (`done:accepted`, `done:issued`, `done:in_progress`, `done:sent`).
    pub action: String,
    /// For `retry`: a fixed delay instead of the backoff; for pauses: their length
    /// (default: the queue's `seller_pause` / `queue_pause`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub after: Option<Duration>,
}

/// Why a configured rule cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("action {action:?}: expected retry, fail, pause_seller, pause_queue or done:<accepted|issued|in_progress|sent>")]
pub struct BadRuleAction {
    /// The offending text.
    pub action: String,
}

/// Default pause lengths a rule without `after` falls back to.
#[derive(Debug, Clone, Copy)]
pub struct PauseDefaults {
    /// Length of a seller pause.
    pub seller: Duration,
    /// Length of a queue pause.
    pub queue: Duration,
}

impl MessageRule {
    /// Checks that `action` names a known action, so a typo fails at startup.
    pub fn validate(&self) -> Result<(), BadRuleAction> {
        self.to_action(PauseDefaults {
            seller: Duration::ZERO,
            queue: Duration::ZERO,
        })
        .map(|_| ())
    }

    /// The action this rule prescribes.
    pub fn to_action(&self, defaults: PauseDefaults) -> Result<Action, BadRuleAction> {
        let bad = || BadRuleAction {
            action: self.action.clone(),
        };
        Ok(match self.action.as_str() {
            "retry" => Action::Retry { after: self.after },
            "fail" => Action::Fail,
            "pause_seller" => Action::PauseSeller(self.after.unwrap_or(defaults.seller)),
            "pause_queue" => Action::PauseQueue(self.after.unwrap_or(defaults.queue)),
            other => match other.strip_prefix("done:").and_then(Outcome::parse) {
                Some(outcome) => Action::Done(outcome),
                None => return Err(bad()),
            },
        })
    }
}

/// The first configured rule whose substring occurs in `message`, as an action.
pub fn first_match(
    rules: &[MessageRule],
    message: &str,
    defaults: PauseDefaults,
) -> Option<Action> {
    rules
        .iter()
        .filter(|rule| !rule.contains.is_empty() && message.contains(&rule.contains))
        .find_map(|rule| rule.to_action(defaults).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(contains: &str, action: &str, after: Option<Duration>) -> MessageRule {
        MessageRule {
            contains: contains.into(),
            action: action.into(),
            after,
        }
    }

    const DEFAULTS: PauseDefaults = PauseDefaults {
        seller: Duration::from_secs(1800),
        queue: Duration::from_secs(600),
    };

    #[test]
    fn first_matching_rule_wins() {
        let rules = vec![
            rule("维护", "retry", Some(Duration::from_secs(60))),
            rule("维护中", "fail", None),
        ];
        assert_eq!(
            first_match(&rules, "系统维护中", DEFAULTS),
            Some(Action::Retry {
                after: Some(Duration::from_secs(60))
            })
        );
        assert_eq!(first_match(&rules, "其他错误", DEFAULTS), None);
    }

    #[test]
    fn pauses_default_to_the_queue_settings() {
        let rules = vec![
            rule("x", "pause_seller", None),
            rule("y", "pause_queue", None),
        ];
        assert_eq!(
            first_match(&rules, "x", DEFAULTS),
            Some(Action::PauseSeller(Duration::from_secs(1800)))
        );
        assert_eq!(
            first_match(&rules, "y", DEFAULTS),
            Some(Action::PauseQueue(Duration::from_secs(600)))
        );
    }

    #[test]
    fn done_outcomes_parse_and_typos_are_refused() {
        assert_eq!(
            rule("a", "done:issued", None).to_action(DEFAULTS),
            Ok(Action::Done(Outcome::Issued))
        );
        assert!(rule("a", "done:finished", None).validate().is_err());
        assert!(rule("a", "retyr", None).validate().is_err());
    }

    #[test]
    fn empty_substring_never_matches() {
        assert_eq!(
            first_match(&[rule("", "fail", None)], "anything", DEFAULTS),
            None
        );
    }
}
