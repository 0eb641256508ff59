-- The events of the filter (the caller's clause) in positions `(?1, ?2]`, counted up
-- to `?3`.
SELECT count(*)
  FROM (SELECT 1 FROM {events} e
         WHERE e.position > ?1 AND e.position <= ?2 {filter} LIMIT ?3)
