-- The newest event's place: the head of the log.
SELECT e.transaction_id, e.position
FROM {events} e
ORDER BY e.position DESC
LIMIT 1
