-- Stores a snapshot unless a newer one is stored.
INSERT INTO {snapshots} (aggregate_type, aggregate_id, version, payload, taken_at)
VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
SET version = excluded.version, payload = excluded.payload, taken_at = excluded.taken_at
WHERE excluded.version > {snapshots}.version
