SELECT {timer_columns}
FROM {timers}
WHERE ($1::text IS NULL OR state = $1)
  AND ($2::text IS NULL OR starts_with(key, $2))
ORDER BY due_at, key
LIMIT $3
