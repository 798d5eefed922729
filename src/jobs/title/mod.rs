//! Titles: pick the format and authorisation code, make sure the row has a serial (stored
//! before the first send so retries reuse it), validate, send to 开票精灵 FPTT1001 and
//! classify the answer.

pub mod classify;

use super::Rules;
use crate::clients::title::{TitleClient, TitleRequest};
use crate::clock::Clock;
use crate::config::DataType;
use crate::queue::action::Attempted;
use crate::queue::attempt::{AttemptRecord, Handler};
use crate::queue::backoff::recent_attempts;
use crate::queue::decide::Processed;
use crate::store::driver::QueueStore as _;
use crate::store::rows::{Claimed, QueueRow, TitleRow};
use crate::store::Database;
use crate::validate::invisible::escape_for_log;
use crate::validate::{self, Rejection};

/// Longest serial (TTQQLSH) the protocol allows.
pub const MAX_SERIAL_CHARS: usize = 20;

/// Defaults applied to rows that leave a value NULL.
#[derive(Debug, Clone)]
pub struct TitleDefaults {
    /// `[title] sqm`.
    pub sqm: Option<String>,
    /// `[title] data_type`.
    pub data_type: DataType,
    /// `[title] ttqqlsh_prefix`.
    pub ttqqlsh_prefix: String,
    /// `[title] lenient_tax_id`.
    pub lenient_tax_id: bool,
}

/// Handles `title_submissions` rows.
pub struct TitleJob {
    store: Database,
    client: TitleClient,
    defaults: TitleDefaults,
    rules: Rules,
    clock: Clock,
}

impl TitleJob {
    /// A handler sending through `client`, storing generated serials in `store` and
    /// classifying answers with `rules`; `clock` dates the serials.
    pub fn new(
        store: Database,
        client: TitleClient,
        defaults: TitleDefaults,
        rules: Rules,
        clock: Clock,
    ) -> Self {
        TitleJob {
            store,
            client,
            defaults,
            rules,
            clock,
        }
    }

    async fn ensure_serial(&self, claimed: &Claimed<TitleRow>) -> Result<String, Processed> {
        if let Some(serial) = claimed
            .row
            .fields
            .ttqqlsh
            .as_deref()
            .filter(|s| !s.is_empty())
        {
            return Ok(serial.to_string());
        }
        let date = self.clock.now_utc().format("%y%m%d").to_string();
        let mut serial = generate_serial(&self.defaults.ttqqlsh_prefix, &date, claimed.meta.id);
        for tries in 0..3 {
            match self
                .store
                .set_title_serial(claimed.meta.id, &claimed.meta.claim_token, &serial)
                .await
            {
                Ok(true) => return Ok(serial),
                Ok(false) => break,
                // A hand-written serial may collide with a generated one: pick another.
                Err(crate::store::StoreError::Constraint(_)) if tries < 2 => {
                    serial = generate_serial(
                        &self.defaults.ttqqlsh_prefix,
                        &date,
                        claimed.meta.id + rand::random_range(1_000_000..i64::from(u32::MAX)),
                    );
                }
                Err(e) => {
                    return Err(Processed::Attempted(Attempted::transient(
                        None,
                        format!("cannot store generated serial: {e}"),
                    )))
                }
            }
        }
        Err(Processed::Attempted(Attempted::transient(
            None,
            "could not store a generated serial (claim lost or collision)",
        )))
    }
}

/// A serial unique per database: prefix + yymmdd + the row id in base 36, zero-padded to
/// exactly 20 characters.
pub fn generate_serial(prefix: &str, yymmdd: &str, id: i64) -> String {
    let head = format!("{prefix}{yymmdd}");
    let width = MAX_SERIAL_CHARS.saturating_sub(head.chars().count());
    let mut digits = to_base36(id.unsigned_abs());
    if digits.len() > width {
        digits = digits[digits.len() - width..].to_string();
    }
    format!("{head}{digits:0>width$}")
}

fn to_base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

impl Handler for TitleJob {
    type Row = TitleRow;

    async fn prepare(&self, claimed: &mut Claimed<TitleRow>) -> Option<Processed> {
        match self.ensure_serial(claimed).await {
            Ok(serial) => {
                claimed.row.fields.ttqqlsh = Some(serial);
                None
            }
            Err(processed) => Some(processed),
        }
    }

    async fn process(&self, claimed: &Claimed<TitleRow>) -> Processed {
        let row = &claimed.row;
        let data_type = match row.data_type {
            None => self.defaults.data_type,
            Some(code) => match DataType::from_code(code) {
                Some(dt) => dt,
                None => {
                    return Processed::Rejected(Rejection::new(
                        "data_type",
                        format!("{code} is not 0 (JSON) or 1 (XML)"),
                    ))
                }
            },
        };
        let sqm = match row
            .sqm
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .or(self.defaults.sqm.as_deref())
        {
            Some(sqm) => sqm.to_string(),
            None => {
                return Processed::Rejected(Rejection::new(
                    "sqm",
                    "empty, and no [title] sqm default is configured",
                ))
            }
        };
        // prepare() stored a serial; an empty one here would be a bug, reported as such.
        if row.fields.ttqqlsh.as_deref().is_none_or(str::is_empty) {
            return Processed::Attempted(Attempted::transient(
                None,
                "row has no serial after prepare",
            ));
        }
        if let Err(rejection) = validate::title::check(&row.fields, self.defaults.lenient_tax_id) {
            return Processed::Rejected(rejection);
        }
        // A serial that may already have reached the server: a "duplicate" reply then means
        // our own earlier send arrived.
        let is_retry = claimed.meta.attempts > 1
            || recent_attempts(&claimed.meta.recent_attempts, self.clock.now_ms()).len() > 1
            || row.last_message.is_some();
        let request = TitleRequest {
            fields: &row.fields,
            sqm: &sqm,
            data_type,
        };
        let result = self.client.send(&request).await;
        Processed::Attempted(classify::classify(
            result,
            is_retry,
            &self.rules.operator,
            self.rules.pauses,
        ))
    }

    fn log_attempt(&self, row: &TitleRow, record: &AttemptRecord) {
        // Values written by other systems may hold characters that reorder or hide the rest
        // of the line (U+202E): shown escaped.
        // Rows are known by their serial once they have one.
        let label = row
            .fields
            .ttqqlsh
            .as_deref()
            .unwrap_or(&row.fields.order_no);
        let ttqqlsh = escape_for_log(label);
        let order_no = escape_for_log(&row.fields.order_no);
        let seller = row.seller();
        let sqm = escape_for_log(&seller);
        crate::log_attempt!(record, ttqqlsh = %ttqqlsh, order_no = %order_no, sqm = %sqm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_twenty_chars_and_unique_per_id() {
        let a = generate_serial("BWDZ", "261122", 1);
        let b = generate_serial("BWDZ", "261122", 2);
        assert_eq!(a, "BWDZ2611220000000001");
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
        assert_eq!(generate_serial("IW", "261122", 36 * 36).len(), 20);
        assert!(generate_serial("IW", "261122", 36 * 36).ends_with("100"));
        assert_eq!(generate_serial("ABCDEFGH", "261122", i64::MAX).len(), 20);
    }
}
