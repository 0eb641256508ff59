-- Removes a dead letter and returns it (to run its event again).
DELETE FROM {dead_letters}
 WHERE id = ?1
RETURNING id, projection, partition, event_id, transaction_id, position, aggregate_type,
          aggregate_id, sequence, event_type, event_version, error, attempts,
          first_failed_at, last_failed_at
