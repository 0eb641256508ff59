SELECT p.projection, p.partition, p.partitions, p.transaction_id::text AS txid, p.position,
       l.owner, COALESCE(l.lease_until >= now(), false) AS lease_valid, p.epoch, p.state,
       p.paused, p.last_error, p.processed, p.rebuild_total, p.updated_at
  FROM {projections} p
  LEFT JOIN {leases} l ON l.projection = p.projection AND l.partition = p.partition
 WHERE $1::text IS NULL OR p.projection = $1
 ORDER BY p.projection, p.partition
