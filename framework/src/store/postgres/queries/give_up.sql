-- Frees a unit's lease if this node holds it, whatever its epoch: a node
-- that lost a unit's epoch (an operator reset it from another process, or
-- another node claimed it) gives the lease up at once instead of renewing it.
UPDATE {leases} SET owner = NULL, lease_until = NULL
 WHERE projection = $1 AND partition = $2 AND owner = $3
