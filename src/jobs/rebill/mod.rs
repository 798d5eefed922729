//! Rebilling: validate the order, send it to fw199 `rebillingnew`, classify the answer.

pub mod classify;

use super::Rules;
use crate::clients::rebill::RebillClient;
use crate::clock::Clock;
use crate::queue::attempt::{AttemptRecord, Handler};
use crate::queue::decide::Processed;
use crate::store::rows::{Claimed, RebillRow};
use crate::validate;
use crate::validate::invisible::escape_for_log;

/// Handles `rebill_orders` rows.
#[derive(Debug, Clone)]
pub struct RebillJob {
    client: RebillClient,
    rules: Rules,
    clock: Clock,
}

impl RebillJob {
    /// A handler sending through `client` and classifying answers with `rules`; `clock`
    /// says when the daily quota resets.
    pub fn new(client: RebillClient, rules: Rules, clock: Clock) -> Self {
        RebillJob {
            client,
            rules,
            clock,
        }
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
        Processed::Attempted(classify::classify(
            result,
            &self.rules.operator,
            self.rules.pauses,
            self.clock.now_utc(),
        ))
    }

    fn log_attempt(&self, row: &RebillRow, record: &AttemptRecord) {
        // Values written by other systems may hold characters that reorder or hide the rest
        // of the line (U+202E): shown escaped.
        let orderno = escape_for_log(&row.orderno);
        let tax_num = escape_for_log(&row.tax_num);
        crate::log_attempt!(record, orderno = %orderno, tax_num = %tax_num);
    }
}
