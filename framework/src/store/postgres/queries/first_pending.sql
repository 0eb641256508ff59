SELECT e.recorded_at FROM {events} e
 WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2)
   {filter}
 ORDER BY e.transaction_id, e.position
 LIMIT 1
