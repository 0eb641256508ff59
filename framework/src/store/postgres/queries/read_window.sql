-- One look at the log for a tailing reader, in one statement and one
-- snapshot: the head (the last event below every transaction still in
-- flight), up to $3 events after the checkpoint ($1, $2) in log order, and
-- whether committed events wait behind an open transaction (rows past the
-- horizon that this snapshot sees are committed). With no event to return,
-- one row carries the head alone.
WITH horizon AS MATERIALIZED (
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin
), head AS MATERIALIZED (
    SELECT e.transaction_id, e.position
      FROM {events} e
     WHERE e.transaction_id < (SELECT h.xmin FROM horizon h)
     ORDER BY e.transaction_id DESC, e.position DESC
     LIMIT 1
), batch AS MATERIALIZED (
    SELECT {columns}, e.transaction_id AS log_transaction
      FROM {events} e
     WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2)
       AND e.transaction_id < (SELECT h.xmin FROM horizon h)
       {filter}
     ORDER BY e.transaction_id, e.position
     LIMIT $3
)
SELECT (SELECT h.transaction_id::text FROM head h) AS head_txid,
       (SELECT h.position FROM head h) AS head_position,
       EXISTS (SELECT 1 FROM {events} e
                WHERE e.transaction_id >= (SELECT h.xmin FROM horizon h)) AS held_back,
       b.*
  FROM (SELECT 1) one
  LEFT JOIN batch b ON true
 ORDER BY b.log_transaction, b.position
