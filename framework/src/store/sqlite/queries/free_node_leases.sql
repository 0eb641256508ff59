-- A node's clean stop: its leases freed, its row gone.
UPDATE {leases}
SET owner = NULL, lease_until = NULL
WHERE owner = ?1
