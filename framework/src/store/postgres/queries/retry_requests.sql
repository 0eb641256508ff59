-- The dead letters a retry is asked of, oldest first.
SELECT d.projection, d.partition::bigint AS partition, d.id FROM {dead_letters} d
 WHERE d.retry_requested_at IS NOT NULL
 ORDER BY d.id
