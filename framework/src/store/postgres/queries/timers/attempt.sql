-- A failed attempt: counted, its error kept, the next one not before
-- `retry_at` (the window skips the timer until then).
UPDATE {timers}
SET attempts = attempts + 1, last_error = $3,
    retry_at = clock_timestamp() + $4::bigint * interval '1 microsecond'
WHERE key = $1 AND command_id = $2 AND state = 'pending'
