//! Row types read back from the queue tables.

use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::FromRow;

use super::QueueName;
use crate::title_fields::TitleFields;

/// What a queue's row type must provide to go through the generic machinery.
/// Each backend reads it from its own row type.
pub trait QueueRow:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Sync + Unpin + Clone + 'static
{
    /// The queue this row type belongs to.
    const QUEUE: QueueName;
    /// The seller key (pause scope) of this row.
    fn seller(&self) -> String;
}

/// The bookkeeping columns every claimed row carries.
#[derive(Debug, Clone, FromRow)]
pub struct ClaimMeta {
    /// Row id.
    pub id: i64,
    /// Attempts so far, including the one just claimed.
    pub attempts: i64,
    /// The row's own attempt limit (NULL = config default).
    pub max_attempts: Option<i64>,
    /// JSON array of recent attempt times (ms), for the per-day cap.
    pub recent_attempts: String,
    /// The claim token this worker must present to complete the row.
    pub claim_token: String,
    /// On a row awaiting confirmation: what the last check saw (`accepted`, `in_progress`,
    /// or `issued` without the invoice's number).
    pub outcome: Option<String>,
    /// When the row was first accepted, if it is being confirmed (ms).
    pub confirm_since: Option<i64>,
}

/// Reads a claimed row of either backend: its bookkeeping and the queue's own columns.
pub(crate) fn decode_claimed<'r, Rw, R>(row: &'r Rw) -> Result<(ClaimMeta, R), sqlx::Error>
where
    Rw: sqlx::Row,
    ClaimMeta: FromRow<'r, Rw>,
    R: FromRow<'r, Rw>,
{
    Ok((ClaimMeta::from_row(row)?, R::from_row(row)?))
}

/// Why a row that cannot be read is rejected (its `last_message`).
pub(crate) fn unreadable_reason(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::ColumnDecode { index, .. } => {
            format!("column {index}: value of the wrong type")
        }
        other => format!("row unreadable: {other}"),
    }
}

/// A row claimed by this worker: bookkeeping plus the queue's own columns.
#[derive(Debug, Clone)]
pub struct Claimed<R> {
    /// Bookkeeping.
    pub meta: ClaimMeta,
    /// The queue's own columns.
    pub row: R,
}

/// A `rebill_orders` row as the worker needs it.
#[derive(Debug, Clone, FromRow)]
pub struct RebillRow {
    /// Row id.
    pub id: i64,
    /// The order number to re-invoice.
    pub orderno: String,
    /// Seller tax number.
    pub tax_num: String,
}

impl QueueRow for RebillRow {
    const QUEUE: QueueName = QueueName::Rebill;
    fn seller(&self) -> String {
        self.tax_num.clone()
    }
}

/// The seller key of title rows that use the configured default `sqm`.
pub const DEFAULT_SELLER: &str = "(default)";

/// A `title_submissions` row as the worker needs it.
#[derive(Clone, FromRow)]
pub struct TitleRow {
    /// Row id.
    pub id: i64,
    /// The FPTT1001 fields; TTQQLSH is NULL until the worker generates one.
    #[sqlx(flatten)]
    pub fields: TitleFields,
    /// Per-row 开票精灵 authorisation code (NULL = config default).
    pub sqm: Option<String>,
    /// Per-row payload format, 0 JSON / 1 XML (NULL = config default).
    pub data_type: Option<i64>,
    /// The previous attempt's message: set once any attempt was made, even after an
    /// operator `retry` reset the attempt count.
    pub last_message: Option<String>,
}

impl std::fmt::Debug for TitleRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The buyer's phone and bank account are personal data: never printed.
        f.debug_struct("TitleRow")
            .field("id", &self.id)
            .field("order_no", &self.fields.order_no)
            .field("ttqqlsh", &self.fields.ttqqlsh)
            .field("gmf_mc", &self.fields.gmf_mc)
            .finish_non_exhaustive()
    }
}

impl QueueRow for TitleRow {
    const QUEUE: QueueName = QueueName::Title;
    fn seller(&self) -> String {
        // Must equal `QueueName::Title.seller_expr()` in SQL.
        match self.sqm.as_deref() {
            Some(sqm) if !sqm.is_empty() => sqm.to_string(),
            _ => DEFAULT_SELLER.to_string(),
        }
    }
}
