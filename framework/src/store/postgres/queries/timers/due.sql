-- The scheduler's window: a range scan of the due index, bounded.
WITH clock AS (SELECT clock_timestamp() + $1::bigint * interval '1 microsecond' AS now)
SELECT clock.now AS clock_now, w.*
FROM clock
LEFT JOIN LATERAL (
    SELECT {timer_columns}
    FROM {timers}
    WHERE state = 'pending'
      AND coalesce(retry_at, due_at) <= clock.now + $2::bigint * interval '1 microsecond'
    ORDER BY coalesce(retry_at, due_at)
    LIMIT $3
) w ON true
