-- Claims a command id in the transaction that appends its events; no row
-- returned when an outcome for it is stored (the caller rolls back).
INSERT INTO {outcomes} (aggregate_type, aggregate_id, command_id, version)
VALUES ($1, $2, $3, $4)
ON CONFLICT (aggregate_type, aggregate_id, command_id) DO NOTHING
RETURNING 1
