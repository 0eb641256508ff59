-- Whether undelivered messages lie after the relay's cursor ($1, $2) although
-- its last read found none: committed behind a transaction that was still in
-- flight when the read looked (they become readable when it ends, and no
-- NOTIFY says so), or committed since. Either way the relay looks again soon.
-- This runs in a snapshot of its own, so it asks about everything after the
-- cursor, not about the read's horizon. A range scan of the
-- (transaction_id, id) index, as read.sql's.
SELECT EXISTS (
    SELECT 1
      FROM {outbox} o
     WHERE (o.transaction_id, o.id) > ($1::text::xid8, $2)
       AND o.delivered_at IS NULL
) AS held_back
