-- One more failed attempt of a dead letter's event, with its error; a retry
-- asked of it is served.
UPDATE {dead_letters}
SET attempts = attempts + 1, error = ?2, last_failed_at = ?3, retry_requested_at = NULL
WHERE id = ?1
