SELECT {timer_columns}
FROM {timers}
WHERE state = 'pending' AND due_at <= ?1
ORDER BY due_at
LIMIT ?2
