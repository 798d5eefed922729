//! Rebilling: validate the order, send it to fw199 `rebillingnew`, classify the answer.

pub mod classify;
pub mod confirm;

use super::Rules;
use crate::clients::rebill::RebillClient;
use crate::clock::Clock;
use crate::queue::attempt::{AttemptRecord, Handler};
use crate::queue::decide::Processed;
use crate::store::rows::{Claimed, RebillRow};
use crate::validate;
use crate::validate::invisible::escape_for_log;
use confirm::ConfirmPolicy;

/// Handles `rebill_orders` rows.
#[derive(Debug, Clone)]
pub struct RebillJob {
    client: RebillClient,
    rules: Rules,
    clock: Clock,
    confirm: Option<ConfirmPolicy>,
}

impl RebillJob {
    /// A handler sending through `client` and classifying answers with `rules`; `clock`
    /// says when the daily quota resets.
    pub fn new(client: RebillClient, rules: Rules, clock: Clock) -> Self {
        RebillJob {
            client,
            rules,
            clock,
            confirm: None,
        }
    }

    /// The same handler following accepted rows to their invoice number (`[rebill]
    /// confirm`); `None` leaves an acceptance `done`.
    pub fn confirming(self, confirm: Option<ConfirmPolicy>) -> Self {
        RebillJob { confirm, ..self }
    }
}

impl Handler for RebillJob {
    type Row = RebillRow;

    async fn process(&self, claimed: &Claimed<RebillRow>) -> Processed {
        let row = &claimed.row;
        if let Err(rejection) = validate::rebill::check(&row.orderno, &row.tax_num) {
            return Processed::Rejected(rejection);
        }
        let result = self.client.send(&row.tax_num, &row.orderno).await;
        let attempted = classify::classify(
            result,
            &self.rules.operator,
            self.rules.pauses,
            self.clock.now_utc(),
        );
        Processed::Attempted(match &self.confirm {
            Some(policy) => policy.apply(attempted, &claimed.meta, self.clock.now_ms()),
            None => attempted,
        })
    }

    fn log_attempt(&self, row: &RebillRow, record: &AttemptRecord) {
        // Values written by other systems may hold characters that reorder or hide the rest
        // of the line (U+202E): shown escaped.
        let orderno = escape_for_log(&row.orderno);
        let tax_num = escape_for_log(&row.tax_num);
        crate::log_attempt!(record, orderno = %orderno, tax_num = %tax_num);
    }
}
