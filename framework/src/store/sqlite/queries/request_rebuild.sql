-- Asks the nodes running projection ?1 to rebuild it (?2: now).
UPDATE {projections} SET rebuild_requested_at = ?2 WHERE projection = ?1
