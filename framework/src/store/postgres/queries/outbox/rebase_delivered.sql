-- After a logical restore: delivered rows sort before everything.
UPDATE {outbox} AS o
   SET transaction_id = '0'::xid8
 WHERE o.delivered_at IS NOT NULL AND o.transaction_id <> '0'::xid8
