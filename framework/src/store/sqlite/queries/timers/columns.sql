key, target, target_id, payload, due_at, command_id, correlation_id, causation_id, metadata,
source_tx, source_pos, state, attempts, last_error, scheduled_at, finished_at, retry_at
