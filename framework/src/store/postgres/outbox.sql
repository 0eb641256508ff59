-- name: table_exists
SELECT to_regclass($1) IS NOT NULL

-- name: enqueue
-- One message in the caller's transaction. Refused (no row returned) when a
-- transaction newer than the caller's has already committed a message of the
-- same key: the caller's message would be delivered before that one although
-- it was enqueued after it committed. The caller retries its whole
-- transaction, which then gets a newer transaction id.
INSERT INTO {outbox} (message_id, key, topic, payload, headers)
SELECT $1, $2, $3, $4::json, $5::jsonb
 WHERE NOT EXISTS (SELECT 1 FROM {outbox} o
                    WHERE o.key = $2 AND o.transaction_id > pg_current_xact_id())
RETURNING id

-- name: read
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

-- name: mark_delivered
UPDATE {outbox} AS o
   SET delivered_at = now()
 WHERE o.id = ANY($1::bigint[])

-- name: cleanup
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

-- name: pending
-- Messages not yet delivered (after the relay's cursor), counted up to $3,
-- and the age of the oldest, measured by the server's clock.
SELECT count(*)::bigint AS pending,
       EXTRACT(EPOCH FROM (now() - min(p.created_at)))::float8 AS oldest_age_seconds
  FROM (SELECT o.created_at
          FROM {outbox} o
         WHERE (o.transaction_id, o.id) > ($1::text::xid8, $2)
           AND o.delivered_at IS NULL
         LIMIT $3) p

-- name: ahead
SELECT COALESCE((SELECT o.transaction_id FROM {outbox} o
                  ORDER BY o.transaction_id DESC LIMIT 1) >= pg_current_xact_id(), false)

-- name: rebase_delivered
-- After a logical restore: delivered rows sort before everything.
UPDATE {outbox} AS o
   SET transaction_id = '0'::xid8
 WHERE o.delivered_at IS NOT NULL AND o.transaction_id <> '0'::xid8

-- name: rebase_pending
-- After a logical restore: pending rows sort after the delivered ones and
-- before every new transaction (whose ids start at 3), in id order, which
-- keeps each key's order (a message enqueued after another's commit has the
-- higher id).
UPDATE {outbox} AS o
   SET transaction_id = '1'::xid8
 WHERE o.delivered_at IS NULL AND o.transaction_id <> '1'::xid8
