-- Makes projection `?1`'s stopped units claimable again.
UPDATE {projections}
SET state = 'idle', last_error = NULL, error_kind = NULL, updated_at = ?2
WHERE projection = ?1
AND state = 'stopped'
