-- After a logical restore into another cluster, the restored rows carry the
-- old cluster's transaction ids, which can be higher than the ids new
-- transactions get here; new events would then sort before old ones. Give
-- every restored row transaction id 0: they were all committed, so they stay
-- readable, in position order, which keeps each stream in sequence order.
UPDATE {events} AS e
   SET transaction_id = '0'::xid8
 WHERE e.transaction_id <> '0'::xid8;
