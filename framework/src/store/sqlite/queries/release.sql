-- Frees unit (`?1`, `?2`) if node `?4` holds it and its epoch is still `?3`.
UPDATE {leases}
SET owner = NULL, lease_until = NULL
WHERE projection = ?1
AND partition = ?2
AND owner = ?4
AND EXISTS (SELECT 1
FROM {projections} p
WHERE p.projection = ?1
AND p.partition = ?2
AND p.epoch = ?3)
