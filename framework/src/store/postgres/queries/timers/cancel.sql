-- Cancels the key's pending timer, unless a later event scheduled it.
UPDATE {timers} SET state = 'cancelled', finished_at = clock_timestamp()
WHERE key = $1 AND state = 'pending'
  AND ($2::bigint IS NULL OR source_tx IS NULL OR (source_tx, source_pos) <= ($2, $3))
