-- Extends until `?3` the leases node `?1` holds and that are valid at `?2`.
-- Only the leases table is written.
UPDATE {leases}
SET lease_until = ?3
WHERE owner = ?1
AND lease_until >= ?2
