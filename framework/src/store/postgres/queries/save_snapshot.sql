INSERT INTO {snapshots} AS s (aggregate_type, aggregate_id, version, payload)
VALUES ($1, $2, $3, $4::json)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
   SET version = EXCLUDED.version, payload = EXCLUDED.payload, taken_at = EXCLUDED.taken_at
 WHERE s.version < EXCLUDED.version
