-- Several commands' events in one statement: each stream keeps its own
-- guard (as in append.sql: at the expected version, and no newer
-- transaction wrote its last event), and a stream whose guard refuses gets
-- no rows while the others are written. Positions follow the requests'
-- order, then each stream's sequence. One request per stream.
WITH req AS (
    SELECT r.aggregate_type, r.aggregate_id, r.expected, r.stream
      FROM UNNEST($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY
           AS r(aggregate_type, aggregate_id, expected, stream)
), ok AS (
    SELECT r.stream, r.aggregate_type, r.aggregate_id, r.expected
      FROM req r
      LEFT JOIN LATERAL (
            SELECT e.sequence, e.transaction_id
              FROM {events} e
             WHERE e.aggregate_type = r.aggregate_type AND e.aggregate_id = r.aggregate_id
             ORDER BY e.sequence DESC
             LIMIT 1) l ON true
     WHERE COALESCE(l.sequence, 0) = r.expected
       AND COALESCE(l.transaction_id <= pg_current_xact_id(), true)
), inserted AS (
    INSERT INTO {events} (aggregate_type, aggregate_id, sequence, event_type, event_version,
                          payload, metadata, event_id, correlation_id, causation_id)
    SELECT o.aggregate_type, o.aggregate_id, o.expected + n.ord, n.event_type, n.event_version,
           n.payload::json, n.metadata::json, n.event_id, n.correlation_id, n.causation_id
      FROM UNNEST($4::bigint[], $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],
                  $10::uuid[], $11::uuid[], $12::uuid[])
           AS n(stream, ord, event_type, event_version, payload, metadata, event_id,
                correlation_id, causation_id)
      JOIN ok o ON o.stream = n.stream
     ORDER BY n.stream, n.ord
    RETURNING aggregate_type, aggregate_id, sequence, position,
              transaction_id::text AS txid, recorded_at
)
SELECT r.stream, i.sequence, i.position, i.txid, i.recorded_at
  FROM inserted i
  JOIN req r ON r.aggregate_type = i.aggregate_type AND r.aggregate_id = i.aggregate_id
