-- The common case, one event: the same guard as append.sql without the
-- arrays (cheaper to bind and to plan).
WITH last AS (
    SELECT e.sequence, e.transaction_id
      FROM {events} e
     WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
     ORDER BY e.sequence DESC
     LIMIT 1
), guard AS (
    SELECT COALESCE((SELECT l.sequence FROM last l), 0) = $3
       AND COALESCE((SELECT l.transaction_id FROM last l) <= pg_current_xact_id(), true) AS ok
)
INSERT INTO {events} (aggregate_type, aggregate_id, sequence, event_type, event_version,
                      payload, metadata, event_id, correlation_id, causation_id)
SELECT $1, $2, $3 + 1, $4, $5, $6::json, $7::json, $8, $9, $10
 WHERE (SELECT g.ok FROM guard g)
RETURNING sequence, position, transaction_id::text AS txid, recorded_at
