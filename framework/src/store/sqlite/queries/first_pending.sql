-- When the first event of the filter (the caller's clause) after position `?1` was
-- recorded (microseconds since the Unix epoch).
SELECT e.recorded_at
  FROM {events} e
 WHERE e.position > ?1 {filter}
 ORDER BY e.position LIMIT 1
