-- The units of projection `?1` (all when `NULL`), with their leases as seen
-- at `?2` (unix milliseconds) and where their latest dead letter stands.
SELECT p.projection, p.partition, p.partitions, p.transaction_id, p.position, l.owner,
       COALESCE(l.owner IS NOT NULL AND l.lease_until >= ?2, 0) AS lease_valid,
       p.epoch, p.state, p.paused, p.last_error, p.error_kind, p.processed,
       p.rebuild_total, p.updated_at,
       (SELECT d.transaction_id FROM {dead_letters} d
         WHERE d.projection = p.projection AND d.partition = p.partition
         ORDER BY d.transaction_id DESC, d.position DESC LIMIT 1) AS parked_transaction_id,
       (SELECT d.position FROM {dead_letters} d
         WHERE d.projection = p.projection AND d.partition = p.partition
         ORDER BY d.transaction_id DESC, d.position DESC LIMIT 1) AS parked_position
  FROM {projections} p
  LEFT JOIN {leases} l ON l.projection = p.projection AND l.partition = p.partition
 WHERE ?1 IS NULL OR p.projection = ?1
 ORDER BY p.projection, p.partition
