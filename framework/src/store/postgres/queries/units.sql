SELECT p.projection, p.partition, p.partitions, p.transaction_id::text AS txid, p.position,
       l.owner, COALESCE(l.lease_until >= now() AND l.owner NOT IN {gone_nodes}, false) AS lease_valid, p.epoch, p.state,
       p.paused, p.last_error, p.error_kind, p.processed, p.rebuild_total, p.updated_at,
       d.transaction_id::text AS parked_txid, d.position AS parked_position
  FROM {projections} p
  LEFT JOIN {leases} l ON l.projection = p.projection AND l.partition = p.partition
  LEFT JOIN LATERAL (
        SELECT d.transaction_id, d.position
          FROM {dead_letters} d
         WHERE d.projection = p.projection AND d.partition = p.partition
         ORDER BY d.transaction_id DESC, d.position DESC
         LIMIT 1) d ON true
 WHERE $1::text IS NULL OR p.projection = $1
 ORDER BY p.projection, p.partition
