-- Forgets outcomes recorded before `?1` (microseconds since the Unix epoch).
DELETE
FROM {outcomes}
WHERE recorded_at < ?1
