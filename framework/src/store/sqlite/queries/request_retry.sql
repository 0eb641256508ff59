-- Asks the nodes running its projection to retry dead letter ?1 (?2: now).
UPDATE {dead_letters} SET retry_requested_at = ?2 WHERE id = ?1
