SELECT COALESCE(MAX(sequence), 0) FROM {events}
 WHERE aggregate_type = ?1 AND aggregate_id = ?2
