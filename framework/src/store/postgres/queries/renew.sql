-- Extends every lease a node holds. Only the leases table is written: a batch
-- in flight (which holds its unit's row in the projections table) never
-- makes a renewal wait.
UPDATE {leases} AS l
   SET lease_until = now() + make_interval(secs => $2)
  FROM {projections} p
 WHERE l.owner = $1 AND l.lease_until >= now()
   AND p.projection = l.projection AND p.partition = l.partition
RETURNING l.projection, l.partition, p.epoch, p.transaction_id::text AS txid, p.position, p.paused
