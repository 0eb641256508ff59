UPDATE {timers}
SET state = 'pending', due_at = ?2, command_id = ?3, attempts = 0, last_error = NULL,
    finished_at = NULL, retry_at = NULL
WHERE key = ?1 AND state IN ('refused', 'failed')
