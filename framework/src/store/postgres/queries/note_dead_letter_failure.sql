UPDATE {dead_letters} AS d
   SET attempts = d.attempts + 1, error = $2, last_failed_at = now()
 WHERE d.id = $1
