SELECT
    coalesce(sum(state = 'pending'), 0) AS pending,
    coalesce(sum(state = 'pending' AND due_at <= ?1), 0) AS overdue,
    coalesce(sum(state = 'pending' AND due_at <= ?2), 0) AS late,
    min(CASE WHEN state = 'pending' THEN due_at END) AS next_due,
    coalesce(sum(state = 'fired'), 0) AS fired,
    coalesce(sum(state = 'refused'), 0) AS refused,
    coalesce(sum(state = 'cancelled'), 0) AS cancelled,
    coalesce(sum(state = 'failed'), 0) AS failed
FROM {timers}
