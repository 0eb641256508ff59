-- Deletes delivered messages older than the retention among the first $2
-- rows in delivery order. Delivery marks rows in that order, so the rows due
-- for deletion are the first ones, and each call reads at most $2 rows however
-- many messages are retained.
WITH head AS (
    SELECT o.id, o.delivered_at
      FROM {outbox} o
     ORDER BY o.transaction_id, o.id
     LIMIT $2
)
DELETE FROM {outbox} AS o
 USING head h
 WHERE o.id = h.id
   AND h.delivered_at < now() - make_interval(secs => $1)
