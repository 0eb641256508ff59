WITH clock AS (SELECT clock_timestamp() + $1::bigint * interval '1 microsecond' AS now)
SELECT
    clock.now AS clock_now,
    count(*) FILTER (WHERE state = 'pending') AS pending,
    count(*) FILTER (WHERE state = 'pending' AND due_at <= clock.now) AS overdue,
    count(*) FILTER (WHERE state = 'pending'
                     AND due_at <= clock.now - $2::bigint * interval '1 microsecond') AS late,
    min(due_at) FILTER (WHERE state = 'pending') AS next_due,
    count(*) FILTER (WHERE state = 'fired') AS fired,
    count(*) FILTER (WHERE state = 'refused') AS refused,
    count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
    count(*) FILTER (WHERE state = 'failed') AS failed
FROM clock LEFT JOIN {timers} ON true
GROUP BY clock.now
