-- Sends every unit of projection `?1` to checkpoint (`?4`, `?5`) with a
-- new epoch, for a replay of `?2` events.
UPDATE {projections}
SET transaction_id = ?4, position = ?5, epoch = epoch + 1, processed = 0, rebuild_total = ?2, state = 'catching_up', last_error = NULL, error_kind = NULL, updated_at = ?3
WHERE projection = ?1
