-- Schedules a timer in the caller's transaction. An existing timer of the
-- key is replaced only by another command id, only when it is not pending
-- (or the caller reschedules), and never by an earlier event's schedule.
WITH previous AS (SELECT state FROM {timers} WHERE key = $1)
INSERT INTO {timers} AS t (key, target, target_id, payload, due_at, command_id, correlation_id,
                           causation_id, metadata, source_tx, source_pos)
VALUES ($1, $2, $3, $4::json,
        COALESCE($5, clock_timestamp() + ($6::bigint + $14::bigint) * interval '1 microsecond'),
        $7, $8, $9, $10::jsonb, $11, $12)
ON CONFLICT (key) DO UPDATE SET
    target = EXCLUDED.target, target_id = EXCLUDED.target_id, payload = EXCLUDED.payload,
    due_at = EXCLUDED.due_at, command_id = EXCLUDED.command_id,
    correlation_id = EXCLUDED.correlation_id, causation_id = EXCLUDED.causation_id,
    metadata = EXCLUDED.metadata, source_tx = EXCLUDED.source_tx,
    source_pos = EXCLUDED.source_pos, state = 'pending', attempts = 0, last_error = NULL,
    retry_at = NULL,
    scheduled_at = clock_timestamp(), finished_at = NULL
WHERE t.command_id <> EXCLUDED.command_id
  AND ($13 OR t.state <> 'pending')
  AND (EXCLUDED.source_tx IS NULL OR t.source_tx IS NULL
       OR (t.source_tx, t.source_pos) < (EXCLUDED.source_tx, EXCLUDED.source_pos))
RETURNING (xmax = 0 OR (SELECT state FROM previous) IS DISTINCT FROM 'pending') AS new
