-- Frees the leases of projection `?1`'s stopped units; runs before
-- `RESTART`, which makes them no longer stopped.
UPDATE {leases}
SET owner = NULL, lease_until = NULL
WHERE projection = ?1
AND partition IN (SELECT p.partition
FROM {projections} p
WHERE p.projection = ?1
AND p.state = 'stopped')
