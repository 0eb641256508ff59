-- A stream for a command: only what rebuilding the aggregate needs, the
-- payload as its stored JSON text.
SELECT 1::bigint AS kind, e.sequence, e.position, e.event_type, e.event_version, e.payload::text AS payload
  FROM {events} e
 WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
 ORDER BY e.sequence
