-- The next messages after the relay's cursor. Only rows of transactions older
-- than every transaction still in flight are served, so a message whose
-- transaction took a lower id and commits later is never skipped. Ordered by
-- the columns themselves and resumed with a row comparison: each batch is a
-- range scan of the (transaction_id, id) index.
SELECT o.id, o.transaction_id::text AS txid, o.message_id, o.key, o.topic,
       o.payload, o.headers, o.created_at
  FROM {outbox} o
 WHERE (o.transaction_id, o.id) > ($1::text::xid8, $2)
   AND o.transaction_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
   AND o.delivered_at IS NULL
 ORDER BY o.transaction_id, o.id
 LIMIT $3
