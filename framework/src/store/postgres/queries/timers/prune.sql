DELETE FROM {timers}
WHERE key IN (
    SELECT key FROM {timers}
    WHERE state <> 'pending' AND finished_at < clock_timestamp() - $1::bigint * interval '1 microsecond'
    ORDER BY finished_at
    LIMIT $2
)
