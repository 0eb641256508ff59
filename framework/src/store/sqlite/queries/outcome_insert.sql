-- Stores a command's outcome unless one is stored: the first one wins.
INSERT INTO {outcomes} (aggregate_type, aggregate_id, command_id, version, refusal, refusal_json, recorded_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
ON CONFLICT (aggregate_type, aggregate_id, command_id) DO NOTHING
