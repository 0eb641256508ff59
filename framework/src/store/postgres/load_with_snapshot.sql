-- A stream for a command in one round trip: the snapshot row (kind 0), then
-- the events after it (kind 1).
SELECT 0 AS kind, s.version AS sequence, NULL::uuid AS event_id,
       s.aggregate_type, s.aggregate_id, NULL::bigint AS position, NULL::text AS txid,
       s.taken_at AS recorded_at, NULL::text AS event_type, NULL::text AS event_version,
       s.payload, NULL::json AS metadata, NULL::uuid AS correlation_id, NULL::uuid AS causation_id
  FROM {snapshots} s
 WHERE s.aggregate_type = $1 AND s.aggregate_id = $2
UNION ALL
SELECT 1 AS kind, e.sequence, e.event_id,
       e.aggregate_type, e.aggregate_id, e.position, e.transaction_id::text,
       e.recorded_at, e.event_type, e.event_version,
       e.payload, e.metadata, e.correlation_id, e.causation_id
  FROM {events} e
 WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
   AND e.sequence > COALESCE((SELECT s.version FROM {snapshots} s
                               WHERE s.aggregate_type = $1 AND s.aggregate_id = $2), 0)
ORDER BY kind, sequence
