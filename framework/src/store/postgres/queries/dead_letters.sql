SELECT d.id, d.projection, d.partition, d.event_id, d.transaction_id::text AS txid, d.position,
       d.aggregate_type, d.aggregate_id, d.sequence, d.event_type, d.event_version,
       d.error, d.attempts, d.first_failed_at, d.last_failed_at
  FROM {dead_letters} d
 WHERE d.projection = $1
 ORDER BY d.id
