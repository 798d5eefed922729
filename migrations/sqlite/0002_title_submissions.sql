-- The invoice-title queue (SPEC §3), drained to 开票精灵 FPTT1001.
CREATE TABLE IF NOT EXISTS title_submissions (
    id               INTEGER PRIMARY KEY,
    order_no         TEXT    NOT NULL CHECK (typeof(order_no) = 'text' AND length(order_no) > 0),
    invoice_type     TEXT    NOT NULL CHECK (invoice_type IN ('1', '2')),
    ttqqlsh          TEXT    UNIQUE CHECK (ttqqlsh IS NULL OR (typeof(ttqqlsh) = 'text' AND length(ttqqlsh) > 0)),
    attach           TEXT    NOT NULL CHECK (typeof(attach) = 'text'),
    gmf_mc           TEXT    NOT NULL CHECK (typeof(gmf_mc) = 'text'),
    gmf_nsrsbh       TEXT CHECK (typeof(gmf_nsrsbh) IN ('text', 'null')),
    gmf_dz           TEXT CHECK (typeof(gmf_dz) IN ('text', 'null')),
    gmf_dh           TEXT CHECK (typeof(gmf_dh) IN ('text', 'null')),
    gmf_yhzh         TEXT CHECK (typeof(gmf_yhzh) IN ('text', 'null')),
    gmf_yhmc         TEXT CHECK (typeof(gmf_yhmc) IN ('text', 'null')),
    remark           TEXT CHECK (typeof(remark) IN ('text', 'null')),
    by1              TEXT CHECK (typeof(by1) IN ('text', 'null')),
    by2              TEXT CHECK (typeof(by2) IN ('text', 'null')),
    sqm              TEXT CHECK (typeof(sqm) IN ('text', 'null')),
    data_type        INTEGER CHECK (data_type IS NULL OR data_type IN (0, 1)),
    status           TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'done', 'failed', 'rejected', 'cancelled')),
    outcome          TEXT    CHECK (outcome IS NULL OR outcome IN ('sent')),
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     INTEGER CHECK (max_attempts IS NULL OR (typeof(max_attempts) = 'integer' AND max_attempts > 0)),
    next_attempt_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
                     CHECK (typeof(next_attempt_at) = 'integer'),
    last_code        TEXT,
    last_message     TEXT,
    -- Kept for the shape of the bookkeeping columns both tables share; titles have no invoice.
    invoice_no       TEXT,
    invoice_down_url TEXT,
    created_at       INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    updated_at       INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    finished_at      INTEGER,
    claim_token      TEXT,
    claimed_by       TEXT,
    lease_expires_at INTEGER,
    recent_attempts  TEXT    NOT NULL DEFAULT '[]'
);

CREATE INDEX IF NOT EXISTS title_submissions_due
    ON title_submissions (next_attempt_at, sqm) WHERE status = 'pending';

CREATE INDEX IF NOT EXISTS title_submissions_leases
    ON title_submissions (lease_expires_at) WHERE status = 'running';

CREATE INDEX IF NOT EXISTS title_submissions_status
    ON title_submissions (status, finished_at);
