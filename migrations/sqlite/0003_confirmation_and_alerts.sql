-- Confirmation (`[rebill] confirm`): when the gateway first accepted the row (code 0 or
-- "in progress") and the daemon began calling again for its invoice number. The title
-- queue never sets it; both tables carry it so that their bookkeeping stays the same.
ALTER TABLE rebill_orders ADD COLUMN confirm_since INTEGER;
ALTER TABLE title_submissions ADD COLUMN confirm_since INTEGER;

-- Alerts waiting to be delivered, written in the same transaction as the state change
-- that raised them (a pause started or lifted, a digest of failed rows, a stuck queue).
-- A delivery claims a row by moving `next_attempt_at` past its lease under a fresh
-- `claim_token`, so a daemon killed mid-delivery leaves it due again for any daemon.
CREATE TABLE IF NOT EXISTS alert_outbox (
    id              INTEGER PRIMARY KEY,
    event           TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'given_up')),
    created_at      INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- JSON array of the target names that have it, so a retry skips them.
    delivered_to    TEXT    NOT NULL DEFAULT '[]',
    last_error      TEXT,
    claim_token     TEXT,
    finished_at     INTEGER
);

CREATE INDEX IF NOT EXISTS alert_outbox_due
    ON alert_outbox (next_attempt_at) WHERE status = 'pending';

CREATE INDEX IF NOT EXISTS alert_outbox_finished
    ON alert_outbox (status, finished_at);

-- How each alert target fared last: `status` reports one failing for long.
CREATE TABLE IF NOT EXISTS alert_targets (
    name          TEXT    PRIMARY KEY,
    failing_since INTEGER,
    last_error    TEXT,
    last_ok_at    INTEGER,
    updated_at    INTEGER NOT NULL
);

-- The monitors' memory (the failed-rows digest's cursor, which queues are stuck), so
-- that several daemons on one database raise each alert once: a change is made only
-- where the value is still the one read.
CREATE TABLE IF NOT EXISTS alert_state (
    key        TEXT    PRIMARY KEY,
    value      INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
