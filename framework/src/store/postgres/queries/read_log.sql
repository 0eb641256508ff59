-- The global log after a checkpoint. Only rows of transactions older than
-- every transaction still in flight are served: a transaction that took a
-- lower position but commits later can then never be skipped. Ordered by the
-- columns themselves and resumed with a row comparison, so each batch is a
-- range scan of the (transaction_id, position) index.
SELECT {columns}
  FROM {events} e
 WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2)
   AND e.transaction_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
   {filter}
 ORDER BY e.transaction_id, e.position
 LIMIT $3
