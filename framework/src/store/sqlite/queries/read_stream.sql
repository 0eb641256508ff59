-- Up to `?4` events of one stream after sequence `?3`, in sequence order.
SELECT {columns}
FROM {events} e
WHERE e.aggregate_type = ?1
AND e.aggregate_id = ?2
AND e.sequence > ?3
ORDER BY e.sequence
LIMIT ?4
