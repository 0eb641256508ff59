UPDATE {outbox} AS o
   SET delivered_at = now()
 WHERE o.id = ANY($1::bigint[])
