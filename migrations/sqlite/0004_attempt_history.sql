-- One record per attempt of a queue row (`[worker] history`, on by default): what was
-- sent, what came back and what the daemon did about it. Written in the transaction that
-- records the attempt's result on the row (also for a rejection, a lease that expired with
-- the outcome unknown, and a release at shutdown). The message is the row's `last_message`
-- as the attempt's log line shows it (scrubbed of secrets, control characters escaped).
CREATE TABLE IF NOT EXISTS attempt_history (
    id          INTEGER PRIMARY KEY,
    queue       TEXT    NOT NULL CHECK (queue IN ('rebill', 'title')),
    row_id      INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    -- When the call started (the claim time for a lease that expired), epoch ms.
    started_at  INTEGER NOT NULL,
    -- NULL when unknown (the daemon holding the row died).
    duration_ms INTEGER,
    -- -1 when no answer arrived (or nothing was sent).
    http_status INTEGER NOT NULL DEFAULT -1,
    code        TEXT,
    message     TEXT,
    -- `done`, `retry`, `fail`, `pause_seller`, `pause_queue`, `await_confirmation`,
    -- `rejected`, `lease_expired` or `released`.
    action      TEXT    NOT NULL,
    -- The status the attempt left the row in.
    status      TEXT    NOT NULL,
    -- The daemon instance that made the attempt (`claimed_by`).
    instance    TEXT,
    recorded_at INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS attempt_history_row ON attempt_history (queue, row_id);

-- Attempts per queue and minute, kept whether or not the history is: the console's chart
-- reads an hour of it (60 rows) instead of counting history rows. One upsert per written
-- batch.
CREATE TABLE IF NOT EXISTS attempt_minutes (
    queue    TEXT    NOT NULL,
    minute   INTEGER NOT NULL,  -- epoch ms / 60000
    attempts INTEGER NOT NULL,
    PRIMARY KEY (queue, minute)
) WITHOUT ROWID;

-- A row's history goes with it, whoever deletes it (housekeeping's prune, an operator).
CREATE TRIGGER IF NOT EXISTS rebill_orders_history_gone AFTER DELETE ON rebill_orders
BEGIN
    DELETE FROM attempt_history WHERE queue = 'rebill' AND row_id = OLD.id;
END;

CREATE TRIGGER IF NOT EXISTS title_submissions_history_gone AFTER DELETE ON title_submissions
BEGIN
    DELETE FROM attempt_history WHERE queue = 'title' AND row_id = OLD.id;
END;
