-- The stream's version alone (read after a refused append, to report it).
SELECT COALESCE(MAX(e.sequence), 0)
FROM {events} e
WHERE e.aggregate_type = ?1
AND e.aggregate_id = ?2
