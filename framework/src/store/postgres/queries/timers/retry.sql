UPDATE {timers}
SET state = 'pending', due_at = clock_timestamp() + $2::bigint * interval '1 microsecond',
    command_id = $3, attempts = 0, last_error = NULL, finished_at = NULL,
    retry_at = NULL
WHERE key = $1 AND state IN ('refused', 'failed')
