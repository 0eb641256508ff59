-- Sends every unit of projection `?1` back to the start of the log with a
-- new epoch, for a rebuild of `?2` events.
UPDATE {projections}
SET transaction_id = 0, position = 0, epoch = epoch + 1, processed = 0, rebuild_total = ?2, state = 'catching_up', last_error = NULL, error_kind = NULL, updated_at = ?3
WHERE projection = ?1
