//! The text of every per-queue statement the worker runs, built once when the store opens
//! (the two tables share their bookkeeping columns, so each statement is written once and
//! instantiated per table).

use super::QueueName;

/// One queue's statements. Placeholders are documented where each is used.
#[derive(Debug)]
pub(crate) struct QueueSql {
    /// `?1` now: is any row due? (A read, so an idle queue never takes the write lock.)
    pub any_due: String,
    /// Steady-state claim: due rows of sellers that are not paused.
    /// `?1` token, `?2` claimed_by, `?3` lease until, `?4` now, `?5` limit, `?6` queue name.
    pub claim: String,
    /// A probe claim of one seller's due rows: as [`QueueSql::claim`], `?6` the seller.
    pub claim_seller: String,
    /// Puts back a row claimed a moment ago in the same transaction (a probe that lost
    /// the race for its pause). `?1` id, `?2` token.
    pub unclaim: String,
    /// `?1` id, `?2` reason, `?3` now: rejects a row the worker cannot read.
    pub reject_unreadable: String,
    /// The queue's pauses a claim must know about: the whole-queue pause, and seller
    /// pauses that ended with no probe in flight. `?1` queue name, `?2` now.
    pub pauses_for_claim: String,
    /// `?1` queue, `?2` scope, `?3` row id, `?4` now: makes a row the probe of an ended
    /// pause, only where no probe is in flight. One row changed = this claim owns it.
    pub mark_probe: String,
    /// `?1` queue, `?2` seller, `?3` now: ends an ended seller pause that has no pending
    /// row left to probe with (and no probe in flight).
    pub lift_idle_seller_pause: String,
    /// Extends a held row's lease. `?1` until, `?2` id, `?3` token.
    pub renew: String,
    /// `?1` now: is there anything for the rescuer (a running row whose lease expired, a
    /// pending row that can never fall due)? A read, so an idle rescuer takes no lock.
    pub rescue_needed: String,
    /// `?1` now, `?2` default max attempts: returns rows whose lease expired.
    pub rescue: String,
    /// `?1` now: rejects pending rows whose `next_attempt_at` is not an integer.
    pub reject_unschedulable: String,
    /// `?1` now, `?2` id, `?3` token: puts an unfinished held row back at shutdown.
    pub release: String,
    /// `?1` now: the next due time after now.
    pub next_due_after: String,
    /// One completion: `?1` id, `?2` token, `?3` status, `?4` outcome, `?5` next attempt,
    /// `?6` refund the attempt, `?7` code, `?8` message, `?9` invoice number, `?10` PDF URL
    /// (both rebill only), `?11` recent attempts, `?12` now, `?13` confirmation start (kept
    /// when NULL).
    pub complete: String,
    /// A batch of completions as one JSON array, `?1`.
    pub complete_batch: String,
    /// `?1` a JSON array of `[row id, attempt, started, duration, http, code, message,
    /// action, status, instance, now]`: records those attempts.
    pub history_of_batch: String,
    /// `?1` now, `?2` default max attempts: records the attempts `rescue` is about to end
    /// (run first, same condition).
    pub history_of_rescue: String,
    /// `?1` now, `?2` id, `?3` token: records the release `release` is about to make.
    pub history_of_release: String,
    /// `?1` id, `?2` reason, `?3` now: records the rejection `reject_unreadable` is about
    /// to make.
    pub history_of_unreadable: String,
    /// `?1` now: records the rejections `reject_unschedulable` is about to make.
    pub history_of_unschedulable: String,
    /// `?1` status, `?2` finished before, `?3` limit: deletes finished rows.
    pub prune: String,
    /// Finished rows per status (O(finished rows)).
    pub finished_counts: String,
    /// `?1` now: pending rows, running rows, the oldest due time of a due pending row, and
    /// pending rows awaiting confirmation (an outcome is recorded only on those), each
    /// through a partial index over active rows.
    pub active_counts: String,
    /// `?1` after, `?2` until (ms): how many rows became `failed` in that window.
    pub failed_between_count: String,
    /// `?1` after, `?2` until, `?3` limit: the first of them (id, order, seller, message).
    pub failed_between: String,
    /// `?1` now, `?2` queue name: the oldest due time of a pending row whose seller is
    /// not paused (rows of paused sellers wait on purpose, and were alerted as such).
    pub oldest_due_unpaused: String,
    /// `?1` now: how many pending rows are due.
    pub due_count: String,
    /// `?1` status or NULL, `?2` limit: rows for display, newest first, whatever their
    /// values' types.
    pub list: String,
    /// The listing's columns and table, without conditions (the console's pages add
    /// their own).
    pub list_select: String,
    /// `?1` id, `?2` now: a finished row pending again with a fresh attempt budget.
    pub retry: String,
    /// `?1` now: every failed row pending again.
    pub retry_all_failed: String,
    /// `?1` now, `?2` seller: that seller's failed rows pending again.
    pub retry_failed_of_seller: String,
    /// `?1` id, `?2` now: cancels a pending row.
    pub cancel: String,
}

/// `UPDATE … RETURNING *` claiming due pending rows that also pass `filter`.
fn claim_update(queue: QueueName, filter: &str) -> String {
    let t = queue.table();
    // INDEXED BY: the partial index over pending rows keeps the claim's cost independent of
    // how many finished rows the table holds; without statistics the planner may prefer the
    // status index and sort, so the choice is not left to it.
    // recent_attempts is guarded with json_valid so a hand-edited value cannot stop claims.
    format!(
        "UPDATE {t} SET status = 'running', attempts = attempts + 1, claim_token = ?1, \
         claimed_by = ?2, lease_expires_at = ?3, updated_at = ?4, \
         recent_attempts = json_insert(CASE WHEN json_valid(recent_attempts) THEN recent_attempts ELSE '[]' END, '$[#]', ?4) \
         WHERE id IN (SELECT id FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND next_attempt_at <= ?4 {filter} \
         ORDER BY next_attempt_at LIMIT ?5) RETURNING *"
    )
}

/// True (in SQL) while pause `p`'s probe row is still being sent.
fn probe_in_flight(queue: QueueName, pause: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {t} x WHERE x.id = {pause}.probe_row_id AND x.status = 'running')",
        t = queue.table()
    )
}

/// The start of every statement that records attempts.
const HISTORY_INSERT: &str =
    "INSERT INTO attempt_history (queue, row_id, attempt, started_at, duration_ms, \
     http_status, code, message, action, status, instance, recorded_at)";

impl QueueSql {
    /// Builds `queue`'s statements.
    pub fn new(queue: QueueName) -> QueueSql {
        let t = queue.table();
        let q = queue.as_str();
        let seller = queue.seller_expr();
        let probing_p = probe_in_flight(queue, "p");
        let probing_pauses = probe_in_flight(queue, "pauses");
        let invoice = match queue {
            QueueName::Rebill => "invoice_no = COALESCE(?9, invoice_no), invoice_down_url = COALESCE(?10, invoice_down_url), ",
            QueueName::Title => "",
        };
        let batch_invoice = match queue {
            QueueName::Rebill => "invoice_no = COALESCE(j.invoice_no, r.invoice_no), \
                                  invoice_down_url = COALESCE(j.invoice_down_url, r.invoice_down_url), ",
            QueueName::Title => "",
        };
        QueueSql {
            any_due: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND next_attempt_at <= ?1)"
            ),
            claim: claim_update(
                queue,
                &format!(
                    // Every seller with a pause row is left out, ended ones too: an ended
                    // pause lets one probe through (claimed apart, under the pause's lock),
                    // never the seller's other rows, whether or not this claim saw the
                    // pause or could lock it.
                    "AND {seller} NOT IN (SELECT p.scope FROM pauses p WHERE p.queue = ?6 AND p.scope <> '*')"
                ),
            ),
            claim_seller: claim_update(queue, &format!("AND {seller} = ?6")),
            unclaim: format!(
                "UPDATE {t} SET status = 'pending', attempts = MAX(attempts - 1, 0), \
                   recent_attempts = json_remove(recent_attempts, '$[#-1]'), \
                   claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
                 WHERE id = ?1 AND claim_token = ?2 AND status = 'running'"
            ),
            reject_unreadable: format!(
                "UPDATE {t} SET status = 'rejected', last_message = ?2, updated_at = ?3, finished_at = ?3, \
                 claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL WHERE id = ?1"
            ),
            pauses_for_claim: format!(
                "SELECT p.scope, p.until_at, {probing_p} FROM pauses p WHERE p.queue = ?1 AND p.scope = '*' \
                 UNION ALL \
                 SELECT * FROM (SELECT p.scope, p.until_at, 0 FROM pauses p \
                   WHERE p.queue = ?1 AND p.scope <> '*' AND p.until_at <= ?2 AND NOT {probing_p} LIMIT 16)"
            ),
            mark_probe: format!(
                "UPDATE pauses SET probe_row_id = ?3 \
                 WHERE queue = ?1 AND scope = ?2 AND until_at <= ?4 AND NOT {probing_pauses}"
            ),
            lift_idle_seller_pause: format!(
                "DELETE FROM pauses WHERE queue = ?1 AND scope = ?2 AND until_at <= ?3 AND NOT {probing_pauses} \
                 AND NOT EXISTS (SELECT 1 FROM {t} WHERE status = 'pending' AND {seller} = ?2)"
            ),
            renew: format!(
                "UPDATE {t} SET lease_expires_at = ?1 WHERE id = ?2 AND claim_token = ?3 AND status = 'running'"
            ),
            rescue_needed: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} INDEXED BY {t}_leases WHERE status = 'running' AND lease_expires_at <= ?1) \
                 OR EXISTS (SELECT 1 FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND next_attempt_at >= '')"
            ),
            rescue: format!(
                "UPDATE {t} SET \
                   status = CASE WHEN attempts >= COALESCE(max_attempts, ?2) THEN 'failed' ELSE 'pending' END, \
                   finished_at = CASE WHEN attempts >= COALESCE(max_attempts, ?2) THEN ?1 ELSE NULL END, \
                   next_attempt_at = ?1, updated_at = ?1, claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, \
                   last_message = 'lease expired during attempt ' || attempts || ': the daemon holding it stopped; outcome unknown' \
                 WHERE status = 'running' AND lease_expires_at <= ?1"
            ),
            reject_unschedulable: format!(
                "UPDATE {t} SET status = 'rejected', updated_at = ?1, finished_at = ?1, \
                   claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, \
                   last_message = 'next_attempt_at: ' || typeof(next_attempt_at) || ' value ' || \
                     substr(quote(next_attempt_at), 1, 42) || \
                     ' is not an INTEGER of Unix epoch milliseconds, so the row can never fall due' \
                 WHERE id IN (SELECT id FROM {t} INDEXED BY {t}_due \
                              WHERE status = 'pending' AND next_attempt_at >= '')"
            ),
            release: format!(
                "UPDATE {t} SET status = 'pending', attempts = MAX(attempts - 1, 0), next_attempt_at = ?1, updated_at = ?1, \
                 claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
                 WHERE id = ?2 AND claim_token = ?3 AND status = 'running'"
            ),
            next_due_after: format!(
                "SELECT MIN(next_attempt_at) FROM {t} WHERE status = 'pending' AND next_attempt_at > ?1"
            ),
            complete: format!(
                "UPDATE {t} SET status = ?3, outcome = ?4, \
                   next_attempt_at = CASE WHEN ?3 = 'pending' THEN ?5 ELSE next_attempt_at END, \
                   attempts = CASE WHEN ?6 THEN MAX(attempts - 1, 0) ELSE attempts END, \
                   last_code = ?7, last_message = ?8, {invoice}\
                   recent_attempts = COALESCE(?11, recent_attempts), updated_at = ?12, \
                   confirm_since = COALESCE(?13, confirm_since), \
                   finished_at = CASE WHEN ?3 = 'pending' THEN NULL ELSE ?12 END, \
                   claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
                 WHERE id = ?1 AND claim_token = ?2 AND status = 'running'"
            ),
            // Each row is updated under the same guard as `complete` (`id`, `claim_token`,
            // `running`), and `RETURNING id` says which were applied. The unary `+` keeps
            // SQLite from driving the join from the status index: json_each is read once and
            // each row found by its id.
            complete_batch: format!(
                "UPDATE {t} AS r SET status = j.status, outcome = j.outcome, \
                   next_attempt_at = CASE WHEN j.status = 'pending' THEN j.next_attempt_at ELSE r.next_attempt_at END, \
                   attempts = CASE WHEN j.refund THEN MAX(r.attempts - 1, 0) ELSE r.attempts END, \
                   last_code = j.last_code, last_message = j.last_message, {batch_invoice}\
                   recent_attempts = COALESCE(j.recent_attempts, r.recent_attempts), updated_at = j.now, \
                   confirm_since = COALESCE(j.confirm_since, r.confirm_since), \
                   finished_at = CASE WHEN j.status = 'pending' THEN NULL ELSE j.now END, \
                   claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
                 FROM (SELECT value ->> 'id' AS id, value ->> 'token' AS token, value ->> 'status' AS status, \
                         value ->> 'outcome' AS outcome, value ->> 'next' AS next_attempt_at, \
                         value ->> 'refund' AS refund, value ->> 'code' AS last_code, \
                         value ->> 'message' AS last_message, value ->> 'invoice_no' AS invoice_no, \
                         value ->> 'url' AS invoice_down_url, value ->> 'recent' AS recent_attempts, \
                         value ->> 'since' AS confirm_since, value ->> 'now' AS now \
                       FROM json_each(?1)) AS j \
                 WHERE r.id = j.id AND +r.claim_token = j.token AND +r.status = 'running' \
                 RETURNING id"
            ),
            history_of_batch: format!(
                "{HISTORY_INSERT} SELECT '{q}', value ->> 0, value ->> 1, value ->> 2, value ->> 3, \
                   value ->> 4, value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10 \
                 FROM json_each(?1)"
            ),
            history_of_rescue: format!(
                "{HISTORY_INSERT} SELECT '{q}', id, attempts, COALESCE(updated_at, ?1), NULL, -1, NULL, \
                   'lease expired during attempt ' || attempts || ': the daemon holding it stopped; outcome unknown', \
                   'lease_expired', CASE WHEN attempts >= COALESCE(max_attempts, ?2) THEN 'failed' ELSE 'pending' END, \
                   claimed_by, ?1 \
                 FROM {t} INDEXED BY {t}_leases WHERE status = 'running' AND lease_expires_at <= ?1"
            ),
            history_of_release: format!(
                "{HISTORY_INSERT} SELECT '{q}', id, attempts, COALESCE(updated_at, ?1), NULL, -1, NULL, \
                   'released at shutdown before an answer was recorded; the attempt is given back', \
                   'released', 'pending', claimed_by, ?1 \
                 FROM {t} WHERE id = ?2 AND claim_token = ?3 AND status = 'running'"
            ),
            history_of_unreadable: format!(
                "{HISTORY_INSERT} SELECT '{q}', id, CASE typeof(attempts) WHEN 'integer' THEN attempts ELSE 0 END, \
                   ?3, NULL, -1, NULL, ?2, 'rejected', 'rejected', claimed_by, ?3 FROM {t} WHERE id = ?1"
            ),
            history_of_unschedulable: format!(
                "{HISTORY_INSERT} SELECT '{q}', id, CASE typeof(attempts) WHEN 'integer' THEN attempts ELSE 0 END, \
                   ?1, NULL, -1, NULL, \
                   'next_attempt_at is not an INTEGER of Unix epoch milliseconds, so the row can never fall due', \
                   'rejected', 'rejected', NULL, ?1 \
                 FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND next_attempt_at >= ''"
            ),
            prune: format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE status = ?1 AND finished_at < ?2 LIMIT ?3)"
            ),
            finished_counts: format!(
                "SELECT status, COUNT(*) FROM {t} INDEXED BY {t}_status \
                 WHERE status IN ('done', 'failed', 'rejected', 'cancelled') GROUP BY status ORDER BY status"
            ),
            active_counts: format!(
                "SELECT (SELECT COUNT(*) FROM {t} INDEXED BY {t}_due WHERE status = 'pending'), \
                   (SELECT COUNT(*) FROM {t} INDEXED BY {t}_leases WHERE status = 'running'), \
                   (SELECT MIN(next_attempt_at) FROM {t} INDEXED BY {t}_due \
                      WHERE status = 'pending' AND next_attempt_at <= ?1), \
                   (SELECT COUNT(*) FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND outcome IS NOT NULL)"
            ),
            failed_between_count: format!(
                "SELECT COUNT(*) FROM {t} WHERE status = 'failed' AND finished_at > ?1 AND finished_at <= ?2"
            ),
            failed_between: format!(
                "SELECT id, CAST({order} AS TEXT), CAST({seller} AS TEXT), COALESCE(CAST(last_message AS TEXT), '') \
                 FROM {t} WHERE status = 'failed' AND finished_at > ?1 AND finished_at <= ?2 \
                 ORDER BY finished_at LIMIT ?3",
                order = queue.order_column()
            ),
            oldest_due_unpaused: format!(
                "SELECT MIN(next_attempt_at) FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND next_attempt_at <= ?1 \
                 AND {seller} NOT IN (SELECT p.scope FROM pauses p WHERE p.queue = ?2)"
            ),
            due_count: format!(
                "SELECT COUNT(*) FROM {t} INDEXED BY {t}_due WHERE status = 'pending' AND next_attempt_at <= ?1"
            ),
            list: format!(
                "{} WHERE (?1 IS NULL OR status = ?1) ORDER BY id DESC LIMIT ?2",
                list_sql(queue)
            ),
            list_select: list_sql(queue),
            retry: format!(
                "UPDATE {t} SET status = 'pending', outcome = NULL, attempts = 0, confirm_since = NULL, \
                 next_attempt_at = ?2, updated_at = ?2, finished_at = NULL \
                 WHERE id = ?1 AND status IN ('failed', 'rejected', 'cancelled')"
            ),
            retry_all_failed: format!(
                "UPDATE {t} SET status = 'pending', outcome = NULL, attempts = 0, confirm_since = NULL, \
                 next_attempt_at = ?1, updated_at = ?1, finished_at = NULL WHERE status = 'failed'"
            ),
            retry_failed_of_seller: format!(
                "UPDATE {t} SET status = 'pending', outcome = NULL, attempts = 0, confirm_since = NULL, \
                 next_attempt_at = ?1, updated_at = ?1, finished_at = NULL WHERE status = 'failed' AND {seller} = ?2"
            ),
            cancel: format!(
                "UPDATE {t} SET status = 'cancelled', updated_at = ?2, finished_at = ?2, \
                 last_message = 'cancelled by operator' WHERE id = ?1 AND status = 'pending'"
            ),
        }
    }
}

/// The listing of `queue`'s rows (columns and table). A value of the wrong type (written around the CHECKs, or
/// the BLOB order number of a row the daemon rejected) never fails it: it is shown
/// described, and the row's `problem` column says so.
fn list_sql(queue: QueueName) -> String {
    let order = queue.order_column();
    let key = match queue {
        QueueName::Rebill => "tax_num",
        QueueName::Title => "ttqqlsh",
    };
    let problems = [
        wrong_type(order, "'text'"),
        wrong_type(key, "'text', 'null'"),
        wrong_type("attempts", "'integer'"),
        wrong_type("next_attempt_at", "'integer'"),
        wrong_type("updated_at", "'integer'"),
    ]
    .join(" || ");
    format!(
        "SELECT id, {order_shown} AS \"order\", {key_shown} AS key, {status} AS status, \
         {outcome} AS outcome, {attempts} AS attempts, {next} AS next_attempt_at, \
         {code} AS last_code, {message} AS last_message, {invoice} AS invoice_no, \
         {url} AS invoice_down_url, {updated} AS updated_at, \
         CASE typeof(finished_at) WHEN 'integer' THEN finished_at END AS finished_at, \
         typeof(finished_at) AS finished_type, \
         CASE WHEN typeof(finished_at) IN ('integer', 'real') THEN CAST(finished_at AS REAL) END AS finished_num, \
         NULLIF(RTRIM({problems}, '; '), '') AS problem \
         FROM {t}",
        order_shown = shown(order),
        key_shown = shown(key),
        status = shown("status"),
        outcome = shown("outcome"),
        attempts = shown_int("attempts"),
        next = shown_int("next_attempt_at"),
        code = shown("last_code"),
        message = shown("last_message"),
        invoice = shown("invoice_no"),
        url = shown("invoice_down_url"),
        updated = shown_int("updated_at"),
        t = queue.table()
    )
}

/// A column read for display whatever it holds: text as it is, a number as text, a BLOB
/// described by its first bytes in hex.
pub(crate) fn shown(col: &str) -> String {
    format!(
        "CASE typeof({col}) WHEN 'blob' THEN '(BLOB ' || substr(quote({col}), 1, 42) || ')' \
         ELSE CAST({col} AS TEXT) END"
    )
}

/// An integer column read for display: 0 when it holds something else (see [`wrong_type`]).
fn shown_int(col: &str) -> String {
    format!("CASE typeof({col}) WHEN 'integer' THEN {col} ELSE 0 END")
}

/// A note (ending in `; `) when `col`'s type is not one of `allowed` (SQL string list).
fn wrong_type(col: &str, allowed: &str) -> String {
    format!(
        "CASE WHEN typeof({col}) NOT IN ({allowed}) THEN '{col} holds ' || typeof({col}) || ' ' \
         || substr(quote({col}), 1, 42) || '; ' ELSE '' END"
    )
}
