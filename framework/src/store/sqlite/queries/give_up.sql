-- Frees unit (`?1`, `?2`) if node `?3` holds it, whatever its epoch (a node
-- that lost the epoch gives the lease up at once).
UPDATE {leases}
SET owner = NULL, lease_until = NULL
WHERE projection = ?1
AND partition = ?2
AND owner = ?3
