UPDATE {timers} SET attempts = attempts + 1, last_error = $3
WHERE key = $1 AND command_id = $2 AND state = 'pending'
