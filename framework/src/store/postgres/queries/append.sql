-- One command's events in one statement. The guard refuses the insert when
-- the stream is not at the expected version, or when its last event was
-- written by a transaction newer than this one (this transaction wrote other
-- rows first, so its id predates that writer's: its events would sort before
-- the stream's last event in the log): append_guard.sql.
-- $11 is the events' time when given (a copy of another log keeps its
-- events' times), else the statement's.
INSERT INTO {events} (aggregate_type, aggregate_id, sequence, event_type, event_version,
                      payload, metadata, event_id, correlation_id, causation_id, recorded_at)
SELECT $1, $2, $3 + n.ord, n.event_type, n.event_version,
       n.payload::json, n.metadata::json, n.event_id, n.correlation_id, n.causation_id,
       COALESCE($11::timestamptz, statement_timestamp())
  FROM UNNEST($4::text[], $5::text[], $6::text[], $7::text[], $8::uuid[], $9::uuid[], $10::uuid[])
       WITH ORDINALITY AS n(event_type, event_version, payload, metadata, event_id,
                            correlation_id, causation_id, ord)
 WHERE {append_guard}
RETURNING sequence, position, transaction_id::text AS txid, recorded_at
