-- After a logical restore: pending rows sort after the delivered ones and
-- before every new transaction (whose ids start at 3), in id order, which
-- keeps each key's order (a message enqueued after another's commit has the
-- higher id).
UPDATE {outbox} AS o
   SET transaction_id = '1'::xid8
 WHERE o.delivered_at IS NULL AND o.transaction_id <> '1'::xid8
