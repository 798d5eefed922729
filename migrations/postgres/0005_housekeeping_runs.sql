-- Which scheduled housekeeping run has been made, so that of several daemons sharing the
-- database (each with the same schedule) one makes each run. PostgreSQL only: a SQLite
-- file has one host, whose daemons' runs are harmless repeats.
CREATE TABLE housekeeping_runs (
    name      TEXT    PRIMARY KEY,
    -- The scheduled time (epoch ms, the scheduling host's clock) of the last run taken.
    slot      BIGINT  NOT NULL,
    taken_by  TEXT    NOT NULL,
    taken_at  BIGINT  NOT NULL
);
