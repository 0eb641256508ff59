-- One more failed attempt of a dead letter's event, with its error.
UPDATE {dead_letters}
SET attempts = attempts + 1, error = ?2, last_failed_at = ?3
WHERE id = ?1
