-- The common case, one event: the same guard as append.sql without the
-- arrays (cheaper to bind and to plan).
INSERT INTO {events} (aggregate_type, aggregate_id, sequence, event_type, event_version,
                      payload, metadata, event_id, correlation_id, causation_id, recorded_at)
SELECT $1, $2, $3 + 1, $4, $5, $6::json, $7::json, $8, $9, $10,
       COALESCE($11::timestamptz, statement_timestamp())
 WHERE {append_guard}
RETURNING sequence, position, transaction_id::text AS txid, recorded_at
