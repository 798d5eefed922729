//! Rebilling: validate the order, send it to fw199 `rebillingnew`.

use crate::clients::rebill::RebillClient;
use crate::queue::decide::Processed;
use crate::queue::worker::Handler;
use crate::store::rows::{Claimed, RebillRow};
use crate::validate;

/// Handles `rebill_orders` rows.
#[derive(Debug, Clone)]
pub struct RebillJob {
    client: RebillClient,
}

impl RebillJob {
    /// A handler sending through `client`.
    pub fn new(client: RebillClient) -> Self {
        RebillJob { client }
    }
}

impl Handler for RebillJob {
    type Row = RebillRow;

    async fn process(&self, claimed: &Claimed<RebillRow>) -> Processed {
        let row = &claimed.row;
        if let Err(rejection) = validate::rebill::check(&row.orderno, &row.tax_num) {
            return Processed::Rejected(rejection);
        }
        Processed::Attempted(self.client.send(&row.tax_num, &row.orderno).await)
    }
}
