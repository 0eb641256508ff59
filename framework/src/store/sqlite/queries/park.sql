-- Parks an event: the unit, the event's identity and place, the error,
-- the attempts, the first failure (`?13`) and now (`?14`).
INSERT INTO {dead_letters} (projection, partition, event_id, transaction_id, position,
                            aggregate_type, aggregate_id, sequence, event_type,
                            event_version, error, attempts, first_failed_at, last_failed_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
