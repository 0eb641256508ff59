SELECT e.recorded_at FROM {events} e
 WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2)
   AND e.transaction_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
   {filter}
 ORDER BY e.transaction_id, e.position
 LIMIT 1
