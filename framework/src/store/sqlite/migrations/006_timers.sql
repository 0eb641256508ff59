-- Migration 6: durable timers (see the PostgreSQL backend's migration 9).
-- Times in microseconds since the Unix epoch, by this machine's clock: the
-- database's clock, for an embedded database.

CREATE TABLE IF NOT EXISTS {timers} (
    key            TEXT    PRIMARY KEY NOT NULL CHECK (key <> ''),
    target         TEXT    NOT NULL,
    target_id      TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    due_at         INTEGER NOT NULL,
    command_id     BLOB    NOT NULL,
    correlation_id BLOB    NOT NULL,
    causation_id   BLOB    NOT NULL,
    metadata       TEXT    NOT NULL DEFAULT '{}',
    source_tx      INTEGER,
    source_pos     INTEGER,
    state          TEXT    NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'fired', 'refused', 'cancelled', 'failed')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    retry_at       INTEGER,
    scheduled_at   INTEGER NOT NULL,
    finished_at    INTEGER
) WITHOUT ROWID;

-- The scheduler's window: pending timers by when to fire them (their due
-- time, or the time of their next attempt after a failed one), nothing else.
CREATE INDEX IF NOT EXISTS {timers_due_idx} ON {timers} (coalesce(retry_at, due_at))
    WHERE state = 'pending';
-- The retention cleanup.
CREATE INDEX IF NOT EXISTS {timers_finished_idx} ON {timers} (finished_at) WHERE state <> 'pending';
