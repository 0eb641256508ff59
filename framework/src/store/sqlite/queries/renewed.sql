-- The units whose leases `renew.sql` just extended, with their state (same
-- parameters; in the same transaction, so the same rows).
SELECT l.projection, l.partition, p.epoch, p.transaction_id, p.position, p.paused
  FROM {leases} l
  JOIN {projections} p ON p.projection = l.projection AND p.partition = l.partition
 WHERE l.owner = ?1 AND l.lease_until >= ?2
 ORDER BY l.projection, l.partition
