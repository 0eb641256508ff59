-- Migration 9: durable timers. A timer is scheduled in the transaction that
-- decides it (a process manager's batch, an inline handler's append, the
-- application's own transaction) and fired by one scheduler node when the
-- database's clock passes `due_at`: its command is sent with `command_id`
-- (so a second firing is recognized), or its message enqueued with the
-- finish. Finished timers are kept for a retention period, so a replayed
-- schedule (a rebuild) finds them and does not schedule them again.

CREATE TABLE IF NOT EXISTS {timers} (
    key            text        PRIMARY KEY CHECK (key <> ''),
    target         text        NOT NULL,
    target_id      text        NOT NULL,
    payload        json        NOT NULL,
    due_at         timestamptz NOT NULL,
    command_id     uuid        NOT NULL,
    correlation_id uuid        NOT NULL,
    causation_id   uuid        NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}',
    source_tx      bigint,
    source_pos     bigint,
    state          text        NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'fired', 'refused', 'cancelled', 'failed')),
    attempts       integer     NOT NULL DEFAULT 0,
    last_error     text,
    retry_at       timestamptz,
    scheduled_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at    timestamptz
);

-- The scheduler's window: pending timers by when to fire them (their due
-- time, or the time of their next attempt after a failed one), nothing else.
CREATE INDEX IF NOT EXISTS {timers_due_idx} ON {timers} ((coalesce(retry_at, due_at)))
    WHERE state = 'pending';
-- The retention cleanup.
CREATE INDEX IF NOT EXISTS {timers_finished_idx} ON {timers} (finished_at) WHERE state <> 'pending';
