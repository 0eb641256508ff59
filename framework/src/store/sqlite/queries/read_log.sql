-- A window of the log after position `?1`, at most `?2` events of the
-- filter (the caller's clause where the template says so), as one JSON array of rows built
-- inside SQLite: one value crosses to Rust instead of a row per event, which
-- is most of the cost of reading. Payload and metadata stay JSON text
-- (strings in the array), so a row that does not decode is still found and
-- named alone.
SELECT json_group_array(json_array(e.position, e.transaction_id, e.aggregate_type,
           e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload,
           e.metadata, hex(e.event_id), e.recorded_at, hex(e.correlation_id),
           hex(e.causation_id)))
  FROM (SELECT * FROM {events} e WHERE e.position > ?1 {filter}
         ORDER BY e.position LIMIT ?2) e
