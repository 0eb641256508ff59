-- A projection's dead letters, oldest first.
SELECT id, projection, partition, event_id, transaction_id, position, aggregate_type,
       aggregate_id, sequence, event_type, event_version, error, attempts,
       first_failed_at, last_failed_at
  FROM {dead_letters}
 WHERE projection = ?1
 ORDER BY id
