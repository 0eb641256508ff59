-- One look at the log for a tailing reader, in one statement and one
-- snapshot: up to $3 events after the checkpoint ($1, $2) in log order (the
-- same range scan as read_log.sql), then one row with the head (the last
-- event below every transaction still in flight) and whether committed
-- events wait behind an open transaction (rows past the horizon that this
-- snapshot sees are committed; found as the first by the log index, not
-- with EXISTS, which drops the ORDER BY and LIMIT that keep it an index
-- probe). The head's row has no event: its columns, in the order of
-- columns.sql, are NULL.
WITH horizon AS MATERIALIZED (
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin
)
(SELECT {columns},
        NULL::text AS head_txid, NULL::bigint AS head_position, NULL::boolean AS held_back
   FROM {events} e
  WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2)
    AND e.transaction_id < (SELECT h.xmin FROM horizon h)
    {filter}
  ORDER BY e.transaction_id, e.position
  LIMIT $3)
UNION ALL
SELECT NULL::uuid, NULL::text, NULL::text, NULL::bigint, NULL::bigint, NULL::text,
       NULL::timestamptz, NULL::text, NULL::text, NULL::text, NULL::text, NULL::uuid, NULL::uuid,
       head.transaction_id::text, head.position,
       (SELECT e.transaction_id FROM {events} e
         WHERE e.transaction_id >= (SELECT h.xmin FROM horizon h)
         ORDER BY e.transaction_id
         LIMIT 1) IS NOT NULL
  FROM (SELECT 1) one
  LEFT JOIN (SELECT e.transaction_id, e.position
               FROM {events} e
              WHERE e.transaction_id < (SELECT h.xmin FROM horizon h)
              ORDER BY e.transaction_id DESC, e.position DESC
              LIMIT 1) head ON true
