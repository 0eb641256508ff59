SELECT {timer_columns}
FROM {timers}
WHERE state = 'pending' AND coalesce(retry_at, due_at) <= ?1
ORDER BY coalesce(retry_at, due_at)
LIMIT ?2
