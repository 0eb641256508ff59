DELETE FROM {timers}
WHERE key IN (
    SELECT key FROM {timers}
    WHERE state <> 'pending' AND finished_at < ?1
    ORDER BY finished_at
    LIMIT ?2
)
