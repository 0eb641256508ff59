-- Deletes a dead letter for good.
DELETE
FROM {dead_letters}
WHERE id = ?1
