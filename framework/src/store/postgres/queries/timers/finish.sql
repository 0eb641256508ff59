UPDATE {timers} SET state = $3, last_error = $4, finished_at = clock_timestamp()
WHERE key = $1 AND command_id = $2 AND state = 'pending'
