//! The pause primitives a claim and a completion use. The state machine (when a pause
//! holds, when one row probes, what lifts it) is the queue's policy (`queue::pauses`); the
//! store offers only steps that stay correct when several claimers race: a probe is marked
//! only where none is in flight, and a probe lifts only the pause it belongs to.

use sqlx::SqliteConnection;

use super::sql::QueueSql;
use super::{QueueName, StoreError};

/// The scope of a pause that covers a whole queue.
pub const WHOLE_QUEUE: &str = "*";

/// A pause as a claim sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseView {
    /// The seller key, or [`WHOLE_QUEUE`].
    pub scope: String,
    /// When the pause ends (ms).
    pub until: i64,
    /// Whether the row probing it is still being sent.
    pub probing: bool,
}

/// One probe a claim sends for an ended pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStep {
    /// The pause's scope.
    pub scope: String,
    /// End the pause at once when its scope has no pending row to probe with.
    pub lift_when_idle: bool,
}

/// What a claim does about pauses, decided by the queue's policy from the [`PauseView`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPlan {
    /// Claim nothing at all.
    pub hold: bool,
    /// Probes to send first, one row each.
    pub probes: Vec<ProbeStep>,
    /// Then claim due rows of scopes that are not paused, up to the limit.
    pub claim_rest: bool,
}

impl ClaimPlan {
    /// Claim the due rows of sellers that are not paused, sending no probe and taking no
    /// notice of a queue-wide pause (tools and tests on a queue without pauses).
    pub fn unpaused() -> ClaimPlan {
        ClaimPlan {
            hold: false,
            probes: Vec::new(),
            claim_rest: true,
        }
    }
}

/// A pause to record together with a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseRecord {
    /// The seller key, or [`WHOLE_QUEUE`].
    pub scope: String,
    /// End of the pause, ms.
    pub until: i64,
    /// Why (the server's message).
    pub reason: String,
}

/// What a completion does to pauses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseChange {
    /// Nothing.
    Nothing,
    /// Starts (or extends) a pause.
    Start(PauseRecord),
    /// Lifts the pause this row was the probe of, if it was one.
    LiftProbed,
}

/// The queue-wide pause and the seller pauses that ended with no probe in flight (at
/// most 16 per claim), as of `now`.
pub(super) async fn for_claim(
    conn: &mut SqliteConnection,
    sql: &QueueSql,
    queue: QueueName,
    now: i64,
) -> Result<Vec<PauseView>, StoreError> {
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(&sql.pauses_for_claim)
        .bind(queue.as_str())
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(scope, until, probing)| PauseView {
            scope,
            until,
            probing,
        })
        .collect())
}

/// Makes row `row_id` the probe of `scope`'s ended pause, only where no probe is in flight;
/// false when another claim got there first.
pub(super) async fn mark_probe(
    conn: &mut SqliteConnection,
    sql: &QueueSql,
    queue: QueueName,
    scope: &str,
    row_id: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(&sql.mark_probe)
        .bind(queue.as_str())
        .bind(scope)
        .bind(row_id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Ends `seller`'s ended pause when no pending row is left to probe it with; true when it
/// did.
pub(super) async fn lift_idle_seller(
    conn: &mut SqliteConnection,
    sql: &QueueSql,
    queue: QueueName,
    seller: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(&sql.lift_idle_seller_pause)
        .bind(queue.as_str())
        .bind(seller)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The alert a new pause raises: a seller that must act, or a whole queue stopped.
pub(super) fn paused_event(
    queue: QueueName,
    pause: &PauseRecord,
    now: i64,
) -> crate::alerts::Event {
    use crate::alerts::{Event, EventKind};
    let kind = if pause.scope == WHOLE_QUEUE {
        EventKind::QueuePaused
    } else {
        EventKind::SellerPaused
    };
    let mut event = Event::new(kind, queue.as_str(), now);
    event.scope = Some(pause.scope.clone());
    event.reason = Some(pause.reason.clone());
    event.until = Some(pause.until);
    event
}

/// The alert a lifted pause raises, saying how it ended.
pub(super) fn lifted_event(
    queue: QueueName,
    scope: &str,
    how: &str,
    now: i64,
) -> crate::alerts::Event {
    use crate::alerts::{Event, EventKind};
    let mut event = Event::new(EventKind::PauseLifted, queue.as_str(), now);
    event.scope = Some(scope.to_string());
    event.reason = Some(how.to_string());
    event
}

/// Starts a pause, or extends one already there (its probe, if any, no longer counts).
/// True when it is a new pause, not the extension of one (an alert is raised once per
/// pause, however many rows hit it and however many probes find it still needed).
pub(super) async fn start(
    conn: &mut SqliteConnection,
    queue: QueueName,
    pause: &PauseRecord,
    now: i64,
) -> Result<bool, StoreError> {
    let (existed,): (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pauses WHERE queue = ?1 AND scope = ?2)")
            .bind(queue.as_str())
            .bind(&pause.scope)
            .fetch_one(&mut *conn)
            .await?;
    sqlx::query(
        "INSERT INTO pauses (queue, scope, until_at, reason, probe_row_id, created_at) \
         VALUES (?1, ?2, ?3, ?4, NULL, ?5) \
         ON CONFLICT (queue, scope) DO UPDATE SET until_at = MAX(until_at, excluded.until_at), \
         reason = excluded.reason, probe_row_id = NULL",
    )
    .bind(queue.as_str())
    .bind(&pause.scope)
    .bind(pause.until)
    .bind(&pause.reason)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::classify)?;
    Ok(!existed)
}

/// Lifts the pause whose probe was `row_id`, and no other; the scope it lifted, if any.
pub(super) async fn lift_probed(
    conn: &mut SqliteConnection,
    queue: QueueName,
    row_id: i64,
) -> Result<Option<String>, StoreError> {
    let lifted: Option<(String,)> =
        sqlx::query_as("DELETE FROM pauses WHERE queue = ?1 AND probe_row_id = ?2 RETURNING scope")
            .bind(queue.as_str())
            .bind(row_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(lifted.map(|(scope,)| scope))
}

/// Whether `queue` has any pause at all (most completions run without one).
pub(super) async fn any(conn: &mut SqliteConnection, queue: QueueName) -> Result<bool, StoreError> {
    let (exists,): (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pauses WHERE queue = ?1)")
            .bind(queue.as_str())
            .fetch_one(&mut *conn)
            .await?;
    Ok(exists)
}

/// Deletes `scope`'s pause (an operator's resume); how many were deleted.
pub(crate) async fn delete(
    conn: &mut SqliteConnection,
    queue: QueueName,
    scope: &str,
) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM pauses WHERE queue = ?1 AND scope = ?2")
        .bind(queue.as_str())
        .bind(scope)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
}
