SELECT p.projection, p.partition, p.partitions, p.transaction_id::text AS txid, p.position,
       p.owner, COALESCE(p.lease_until >= now(), false) AS lease_valid, p.epoch, p.state,
       p.paused, p.last_error, p.processed, p.rebuild_total, p.updated_at
  FROM {projections} p
 WHERE $1::text IS NULL OR p.projection = $1
 ORDER BY p.projection, p.partition
