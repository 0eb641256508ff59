SELECT {timer_columns}
FROM {timers}
WHERE (?1 IS NULL OR state = ?1)
  AND (?2 IS NULL OR substr(key, 1, length(?2)) = ?2)
ORDER BY due_at, key
LIMIT ?3
