-- One more failed attempt of a dead letter's event, with its error; a retry
-- asked of it is served.
UPDATE {dead_letters} AS d
   SET attempts = d.attempts + 1, error = $2, last_failed_at = now(), retry_requested_at = NULL
 WHERE d.id = $1
