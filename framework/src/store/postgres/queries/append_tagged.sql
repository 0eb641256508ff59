-- One command's events with their tags, in one statement: append.sql's
-- insert, guarded by the stream's version and by the condition (no event
-- matching the condition's query after what the writer read; `TRUE` when
-- there is none), and the tags' rows for each event written. $11 and $12
-- are the tags and the 1-based index of the event each belongs to. With a
-- command id ($13, else NULL), the command is claimed at the version the
-- append reaches, as claim_command.sql does: `claimed` is 0 on every row
-- when an outcome for it is stored (the caller rolls back).
WITH written AS (
    INSERT INTO {events} (aggregate_type, aggregate_id, sequence, event_type, event_version,
                          payload, metadata, event_id, correlation_id, causation_id, recorded_at)
    SELECT $1, $2, $3 + n.ord, n.event_type, n.event_version,
           n.payload::json, n.metadata::json, n.event_id, n.correlation_id, n.causation_id,
           statement_timestamp()
      FROM UNNEST($4::text[], $5::text[], $6::text[], $7::text[], $8::uuid[], $9::uuid[], $10::uuid[])
           WITH ORDINALITY AS n(event_type, event_version, payload, metadata, event_id,
                                correlation_id, causation_id, ord)
     WHERE {append_guard} AND {condition}
    RETURNING sequence, position, transaction_id, recorded_at
), tagged AS (
    INSERT INTO {tags} (tag, transaction_id, position)
    SELECT t.tag, w.transaction_id, w.position
      FROM written w
      JOIN UNNEST($11::text[], $12::bigint[]) AS t(tag, ord) ON w.sequence = $3 + t.ord
), claimed AS (
    INSERT INTO {outcomes} (aggregate_type, aggregate_id, command_id, version)
    SELECT $1, $2, $13::uuid, max(w.sequence)
      FROM written w
     WHERE $13::uuid IS NOT NULL
    HAVING count(*) > 0
    ON CONFLICT (aggregate_type, aggregate_id, command_id) DO NOTHING
    RETURNING 1
)
SELECT w.sequence, w.position, w.transaction_id::text AS txid, w.recorded_at,
       (SELECT count(*) FROM claimed) AS claimed
  FROM written w
