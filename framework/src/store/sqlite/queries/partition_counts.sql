-- The partition counts a projection is registered with (one, unless two
-- deployments disagree).
SELECT DISTINCT p.partitions
FROM {projections} p
WHERE p.projection = ?1
