-- The rebilling queue (SPEC §3). Times are Unix epoch milliseconds, UTC.
-- typeof() checks refuse, at insert time, values the worker could not read (a BLOB order
-- number, a text max_attempts), so one bad row can never stop the queue.
-- The default expression works on any SQLite (no unixepoch('subsec')), so writers using an
-- older sqlite3 shell get the same defaults.
CREATE TABLE IF NOT EXISTS rebill_orders (
    id               INTEGER PRIMARY KEY,
    orderno          TEXT    NOT NULL CHECK (typeof(orderno) = 'text' AND length(orderno) > 0),
    tax_num          TEXT    NOT NULL CHECK (typeof(tax_num) = 'text' AND length(tax_num) > 0),
    status           TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'done', 'failed', 'rejected', 'cancelled')),
    outcome          TEXT    CHECK (outcome IS NULL OR outcome IN ('accepted', 'issued', 'in_progress')),
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     INTEGER CHECK (max_attempts IS NULL OR (typeof(max_attempts) = 'integer' AND max_attempts > 0)),
    next_attempt_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
                     CHECK (typeof(next_attempt_at) = 'integer'),
    last_code        TEXT,
    last_message     TEXT,
    invoice_no       TEXT,
    invoice_down_url TEXT,
    created_at       INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at       INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    finished_at      INTEGER,
    -- Internal bookkeeping, not part of the public contract.
    claim_token      TEXT,
    claimed_by       TEXT,
    lease_expires_at INTEGER,
    recent_attempts  TEXT    NOT NULL DEFAULT '[]'
);

-- One active row per order: INSERT OR IGNORE is the idempotent insert.
CREATE UNIQUE INDEX IF NOT EXISTS rebill_orders_one_active
    ON rebill_orders (tax_num, orderno) WHERE status IN ('pending', 'running');

-- The claim query walks only pending rows, so its cost does not grow with finished rows.
CREATE INDEX IF NOT EXISTS rebill_orders_due
    ON rebill_orders (next_attempt_at, tax_num) WHERE status = 'pending';

-- Lease renewal and rescue touch only running rows.
CREATE INDEX IF NOT EXISTS rebill_orders_leases
    ON rebill_orders (lease_expires_at) WHERE status = 'running';

-- Status counts and housekeeping by age.
CREATE INDEX IF NOT EXISTS rebill_orders_status
    ON rebill_orders (status, finished_at);

-- Pauses: per seller (scope = tax_num) or for a whole queue (scope = '*').
CREATE TABLE IF NOT EXISTS pauses (
    queue        TEXT    NOT NULL CHECK (queue IN ('rebill', 'title')),
    scope        TEXT    NOT NULL CHECK (length(scope) > 0),
    until_at     INTEGER NOT NULL,
    reason       TEXT    NOT NULL,
    probe_row_id INTEGER,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (queue, scope)
);
