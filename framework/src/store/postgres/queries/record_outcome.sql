-- Stores an outcome unless one is stored for the command; returns the
-- stored one either way (the second branch sees a row committed before
-- this statement started waiting on it).
WITH inserted AS (
    INSERT INTO {outcomes} (aggregate_type, aggregate_id, command_id, version, refusal, refusal_json)
    VALUES ($1, $2, $3, $4, $5, $6::json)
    ON CONFLICT (aggregate_type, aggregate_id, command_id) DO NOTHING
    RETURNING version, refusal, refusal_json::text AS refusal_json, recorded_at
)
SELECT version, refusal, refusal_json, recorded_at FROM inserted
UNION ALL
SELECT o.version, o.refusal, o.refusal_json::text, o.recorded_at
  FROM {outcomes} o
 WHERE o.aggregate_type = $1 AND o.aggregate_id = $2 AND o.command_id = $3
   AND NOT EXISTS (SELECT 1 FROM inserted)
