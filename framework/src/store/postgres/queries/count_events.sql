SELECT count(*) FROM (SELECT 1 FROM {events} e
 WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2)
   AND (e.transaction_id, e.position) <= ($3::text::xid8, $4)
   {filter}
 LIMIT $5) c
