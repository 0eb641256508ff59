-- The dead letters a retry is asked of, oldest first.
SELECT projection, partition, id FROM {dead_letters} WHERE retry_requested_at IS NOT NULL ORDER BY id
