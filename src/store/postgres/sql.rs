//! The text of every per-queue statement the PostgreSQL store runs, built once (the two
//! tables share their bookkeeping columns). `now` is always the database's clock, read
//! once per transaction (`ClockBoundary`) and bound as a parameter.

use crate::store::QueueName;

/// One queue's statements. Placeholders are documented where each is used.
#[derive(Debug)]
pub(super) struct QueueSql {
    /// `$1` queue: what a claim looks at first, in one statement: the database's now,
    /// whether any row is due by it, and the whole-queue pause and the ended seller pauses
    /// with no probe in flight (at most 16), one row each (or one row of NULLs for none).
    pub claim_look: String,
    /// Steady-state claim of due rows of sellers that are not paused. `$1` token,
    /// `$2` claimed_by, `$3` lease until, `$4` now, `$5` limit, `$6` queue name.
    pub claim: String,
    /// A probe claim of one seller's due rows: as `claim`, `$6` the seller.
    pub claim_seller: String,
    /// `$1` id, `$2` token: puts back a row claimed a moment ago in this transaction.
    pub unclaim: String,
    /// `$1` id, `$2` reason, `$3` now: rejects a row the worker cannot read.
    pub reject_unreadable: String,
    /// `$1` id, `$2` reason, `$3` now: records that rejection in the history.
    pub history_of_unreadable: String,
    /// `$1` queue, `$2` scope, `$3` now: locks an ended pause whose probe is not in flight;
    /// no row when another daemon's claim holds it (that claim probes it).
    pub lock_pause: String,
    /// `$1` queue, `$2` scope, `$3` row id, `$4` now: makes the row the pause's probe.
    pub mark_probe: String,
    /// `$1` queue, `$2` seller, `$3` now: ends an ended seller pause with no pending row.
    pub lift_idle_seller_pause: String,
    /// `$1` ids, `$2` tokens, `$3` the lease's length (ms): extends held rows' leases to the
    /// database's now plus it, returning those renewed.
    pub renew: String,
    /// `$1` now, `$2` default max attempts: ends attempts whose lease expired.
    pub rescue: String,
    /// `$1` now, `$2` ids, `$3` tokens: puts unfinished held rows back at shutdown.
    pub release: String,
    /// `$1` now: the next due time after now.
    pub next_due_after: String,
    /// A batch of completions as arrays, `$1` … `$12`, `$13` now: see `complete`.
    pub complete_batch: String,
    /// Attempts as arrays, `$1` … `$11`: records them.
    pub history_of_batch: String,
    /// `$1` after, `$2` until: how many rows became `failed` in that window.
    pub failed_between_count: String,
    /// `$1` after, `$2` until, `$3` limit: the first of them (id, order, seller, message).
    pub failed_between: String,
    /// `$1` now, `$2` queue name: the oldest due time of a pending row whose seller is not
    /// paused.
    pub oldest_due_unpaused: String,
    /// `$1` now: how many pending rows are due.
    pub due_count: String,
}

/// The history table's columns, in the order every recording statement fills them.
const HISTORY_INSERT: &str =
    "INSERT INTO attempt_history (queue, row_id, attempt, started_at, duration_ms, \
     http_status, code, message, action, status, instance, recorded_at)";

/// Claims due pending rows passing `filter`. The rows are picked in a CTE with `FOR
/// UPDATE SKIP LOCKED`, so that daemons claiming at once take different rows without
/// waiting for each other, and the LIMIT holds (a LIMIT in the UPDATE's own subquery can be
/// re-evaluated after a lock wait).
fn claim_update(queue: QueueName, filter: &str) -> String {
    let t = queue.table();
    format!(
        "WITH picked AS (SELECT id FROM {t} WHERE status = 'pending' AND next_attempt_at <= $4 {filter} \
           ORDER BY next_attempt_at LIMIT $5 FOR UPDATE SKIP LOCKED) \
         UPDATE {t} AS r SET status = 'running', attempts = r.attempts + 1, claim_token = $1, \
           claimed_by = $2, lease_expires_at = $3, updated_at = $4, \
           recent_attempts = (invoice_worker_times(r.recent_attempts) || to_jsonb($4::BIGINT))::TEXT \
         FROM picked WHERE r.id = picked.id RETURNING r.*"
    )
}

/// True (in SQL) while pause `p`'s probe row is still being sent.
fn probe_in_flight(queue: QueueName, pause: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {t} x WHERE x.id = {pause}.probe_row_id AND x.status = 'running')",
        t = queue.table()
    )
}

impl QueueSql {
    /// Builds `queue`'s statements.
    pub fn new(queue: QueueName) -> QueueSql {
        let t = queue.table();
        let q = queue.as_str();
        let seller = queue.seller_expr();
        let probing_p = probe_in_flight(queue, "p");
        let batch_invoice = match queue {
            QueueName::Rebill => {
                "invoice_no = COALESCE(j.invoice_no, r.invoice_no), \
                                  invoice_down_url = COALESCE(j.url, r.invoice_down_url), "
            }
            QueueName::Title => "",
        };
        QueueSql {
            claim: claim_update(
                queue,
                &format!(
                    // Every seller with a pause row is left out, ended ones too: an ended
                    // pause lets one probe through (claimed apart, under the pause's lock),
                    // never the seller's other rows, whether or not this claim saw the
                    // pause or could lock it.
                    "AND {seller} NOT IN (SELECT p.scope FROM pauses p WHERE p.queue = $6 AND p.scope <> '*')"
                ),
            ),
            claim_seller: claim_update(queue, &format!("AND {seller} = $6")),
            unclaim: format!(
                "UPDATE {t} SET status = 'pending', attempts = GREATEST(attempts - 1, 0), \
                   recent_attempts = (invoice_worker_times(recent_attempts) - (-1))::TEXT, \
                   claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
                 WHERE id = $1 AND claim_token = $2 AND status = 'running'"
            ),
            reject_unreadable: format!(
                "UPDATE {t} SET status = 'rejected', last_message = $2, updated_at = $3, finished_at = $3, \
                 claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL WHERE id = $1"
            ),
            history_of_unreadable: format!(
                "{HISTORY_INSERT} SELECT '{q}', id, attempts, $3, NULL, -1, NULL, $2, 'rejected', 'rejected', \
                   claimed_by, $3 FROM {t} WHERE id = $1"
            ),
            claim_look: format!(
                "WITH d AS (SELECT c.now, EXISTS (SELECT 1 FROM {t} WHERE status = 'pending' AND next_attempt_at <= c.now) AS any_due \
                   FROM (SELECT invoice_worker_now_ms() AS now) c) \
                 SELECT d.now, d.any_due, v.scope, v.until_at, v.probing FROM d LEFT JOIN LATERAL ( \
                   (SELECT p.scope, p.until_at, {probing_p} AS probing FROM pauses p WHERE p.queue = $1 AND p.scope = '*') \
                   UNION ALL \
                   (SELECT p.scope, p.until_at, false FROM pauses p \
                     WHERE p.queue = $1 AND p.scope <> '*' AND p.until_at <= d.now AND NOT {probing_p} LIMIT 16) \
                 ) v ON d.any_due"
            ),
            lock_pause: format!(
                "SELECT p.scope FROM pauses p WHERE p.queue = $1 AND p.scope = $2 AND p.until_at <= $3 \
                 AND NOT {probing_p} FOR UPDATE SKIP LOCKED"
            ),
            mark_probe: format!(
                "UPDATE pauses p SET probe_row_id = $3 \
                 WHERE p.queue = $1 AND p.scope = $2 AND p.until_at <= $4 AND NOT {probing_p}"
            ),
            lift_idle_seller_pause: format!(
                "DELETE FROM pauses p WHERE p.queue = $1 AND p.scope = $2 AND p.until_at <= $3 AND NOT {probing_p} \
                 AND NOT EXISTS (SELECT 1 FROM {t} WHERE status = 'pending' AND {seller} = $2)"
            ),
            renew: format!(
                "UPDATE {t} AS r SET lease_expires_at = invoice_worker_now_ms() + $3 \
                 FROM unnest($1::BIGINT[], $2::TEXT[]) AS h(id, token) \
                 WHERE r.id = h.id AND r.claim_token = h.token AND r.status = 'running' RETURNING r.id"
            ),
            // The history of the attempts it ends is written by the same statement, from
            // the rows it changed (`old`), so the two cannot disagree.
            rescue: format!(
                "WITH ended AS (SELECT id, attempts, COALESCE(updated_at, $1) AS started, claimed_by, \
                     CASE WHEN attempts >= COALESCE(max_attempts, $2) THEN 'failed' ELSE 'pending' END AS next_status \
                   FROM {t} WHERE status = 'running' AND lease_expires_at <= $1 FOR UPDATE SKIP LOCKED), \
                 changed AS (UPDATE {t} AS r SET status = e.next_status, \
                     finished_at = CASE WHEN e.next_status = 'failed' THEN $1 ELSE NULL END, \
                     next_attempt_at = $1, updated_at = $1, claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, \
                     last_message = 'lease expired during attempt ' || r.attempts || ': the daemon holding it stopped; outcome unknown' \
                   FROM ended e WHERE r.id = e.id AND r.status = 'running' RETURNING r.id), \
                 recorded AS ({HISTORY_INSERT} SELECT '{q}', e.id, e.attempts, e.started, NULL, -1, NULL, \
                     'lease expired during attempt ' || e.attempts || ': the daemon holding it stopped; outcome unknown', \
                     'lease_expired', e.next_status, e.claimed_by, $1 \
                   FROM ended e JOIN changed c ON c.id = e.id WHERE $3) \
                 SELECT COUNT(*) FROM changed"
            ),
            release: format!(
                "WITH held AS (SELECT r.id, r.attempts, COALESCE(r.updated_at, $1) AS started, r.claimed_by \
                   FROM {t} r JOIN unnest($2::BIGINT[], $3::TEXT[]) AS h(id, token) \
                     ON r.id = h.id AND r.claim_token = h.token \
                   WHERE r.status = 'running' FOR UPDATE OF r), \
                 changed AS (UPDATE {t} AS r SET status = 'pending', attempts = GREATEST(r.attempts - 1, 0), \
                     next_attempt_at = $1, updated_at = $1, claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
                   FROM held WHERE r.id = held.id RETURNING r.id), \
                 recorded AS ({HISTORY_INSERT} SELECT '{q}', held.id, held.attempts, held.started, NULL, -1, NULL, \
                     'released at shutdown before an answer was recorded; the attempt is given back', \
                     'released', 'pending', held.claimed_by, $1 FROM held WHERE $4) \
                 SELECT COUNT(*) FROM changed"
            ),
            next_due_after: format!(
                "SELECT MIN(next_attempt_at) FROM {t} WHERE status = 'pending' AND next_attempt_at > $1"
            ),
            complete_batch: format!(
                "UPDATE {t} AS r SET status = j.status, outcome = j.outcome, \
                   next_attempt_at = CASE WHEN j.status = 'pending' THEN j.next ELSE r.next_attempt_at END, \
                   attempts = CASE WHEN j.refund THEN GREATEST(r.attempts - 1, 0) ELSE r.attempts END, \
                   last_code = j.code, last_message = j.message, {batch_invoice}\
                   recent_attempts = COALESCE(j.recent, r.recent_attempts), updated_at = $13, \
                   confirm_since = COALESCE(j.since, r.confirm_since), \
                   finished_at = CASE WHEN j.status = 'pending' THEN NULL ELSE $13 END, \
                   claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL \
                 FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BOOLEAN[], \
                             $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::BIGINT[]) \
                   AS j(id, token, status, outcome, next, refund, code, message, invoice_no, url, recent, since) \
                 WHERE r.id = j.id AND r.claim_token = j.token AND r.status = 'running' \
                 RETURNING r.id"
            ),
            history_of_batch: format!(
                "{HISTORY_INSERT} SELECT '{q}', h.* FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], \
                   $4::BIGINT[], $5::BIGINT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], \
                   $11::BIGINT[]) AS h"
            ),
            failed_between_count: format!(
                "SELECT COUNT(*) FROM {t} WHERE status = 'failed' AND finished_at > $1 AND finished_at <= $2"
            ),
            failed_between: format!(
                "SELECT id, {order}, {seller}, COALESCE(last_message, '') \
                 FROM {t} WHERE status = 'failed' AND finished_at > $1 AND finished_at <= $2 \
                 ORDER BY finished_at LIMIT $3",
                order = queue.order_column()
            ),
            oldest_due_unpaused: format!(
                "SELECT MIN(next_attempt_at) FROM {t} WHERE status = 'pending' AND next_attempt_at <= $1 \
                 AND {seller} NOT IN (SELECT p.scope FROM pauses p WHERE p.queue = $2)"
            ),
            due_count: format!(
                "SELECT COUNT(*) FROM {t} WHERE status = 'pending' AND next_attempt_at <= $1"
            ),
        }
    }
}
