-- Schedules a timer in the caller's transaction (see the PostgreSQL
-- statement for the rule).
INSERT INTO {timers} AS t (key, target, target_id, payload, due_at, command_id, correlation_id,
                           causation_id, metadata, source_tx, source_pos, scheduled_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?13)
ON CONFLICT (key) DO UPDATE SET
    target = excluded.target, target_id = excluded.target_id, payload = excluded.payload,
    due_at = excluded.due_at, command_id = excluded.command_id,
    correlation_id = excluded.correlation_id, causation_id = excluded.causation_id,
    metadata = excluded.metadata, source_tx = excluded.source_tx,
    source_pos = excluded.source_pos, state = 'pending', attempts = 0, last_error = NULL,
    retry_at = NULL,
    scheduled_at = excluded.scheduled_at, finished_at = NULL
WHERE t.command_id <> excluded.command_id
  AND (?12 OR t.state <> 'pending')
  AND (excluded.source_tx IS NULL OR t.source_tx IS NULL
       OR (t.source_tx, t.source_pos) < (excluded.source_tx, excluded.source_pos))
RETURNING key
