SELECT e.transaction_id::text AS txid, e.position
  FROM {events} e
 WHERE e.transaction_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
 ORDER BY e.transaction_id DESC, e.position DESC
 LIMIT 1
