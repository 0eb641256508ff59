UPDATE {timers} SET state = 'cancelled', finished_at = ?4
WHERE key = ?1 AND state = 'pending'
  AND (?2 IS NULL OR source_tx IS NULL OR (source_tx, source_pos) <= (?2, ?3))
