SELECT e.transaction_id::text AS txid, e.position
  FROM {events} e
 ORDER BY e.transaction_id DESC, e.position DESC
 LIMIT 1
