-- The common case, one event: the same guard as append.sql without the
-- arrays (cheaper to bind and to plan).
INSERT INTO {events} (aggregate_type, aggregate_id, sequence, event_type, event_version,
                      payload, metadata, event_id, correlation_id, causation_id)
SELECT $1, $2, $3 + 1, $4, $5, $6::json, $7::json, $8, $9, $10
 WHERE COALESCE((SELECT e.sequence = $3 AND e.transaction_id <= pg_current_xact_id()
                   FROM {events} e
                  WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
                  ORDER BY e.sequence DESC
                  LIMIT 1),
                $3 = 0)
RETURNING sequence, position, transaction_id::text AS txid, recorded_at
