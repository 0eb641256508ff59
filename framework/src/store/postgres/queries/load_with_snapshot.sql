-- A stream for a command in one round trip: the snapshot row (kind 0), then
-- the events after it (kind 1), payloads as their stored JSON text.
SELECT 0::bigint AS kind, s.version AS sequence, NULL::bigint AS position,
       NULL::text AS event_type, NULL::text AS event_version, s.payload::text AS payload
  FROM {snapshots} s
 WHERE s.aggregate_type = $1 AND s.aggregate_id = $2
UNION ALL
SELECT 1::bigint AS kind, e.sequence, e.position, e.event_type, e.event_version, e.payload::text
  FROM {events} e
 WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
   AND e.sequence > COALESCE((SELECT s.version FROM {snapshots} s
                               WHERE s.aggregate_type = $1 AND s.aggregate_id = $2), 0)
ORDER BY kind, sequence
