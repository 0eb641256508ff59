-- The stored outcome of one command id, if any.
SELECT o.version, o.refusal, o.refusal_json, o.recorded_at
FROM {outcomes} o
WHERE o.aggregate_type = ?1
AND o.aggregate_id = ?2
AND o.command_id = ?3
