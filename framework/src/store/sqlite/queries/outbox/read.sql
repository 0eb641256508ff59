-- The next messages after the relay's cursor, in id (= commit) order: a
-- range scan of the primary key.
SELECT o.id, o.message_id, o.key, o.topic, o.payload, o.headers, o.created_at
  FROM {outbox} o
 WHERE o.id > ?1
   AND o.delivered_at IS NULL
 ORDER BY o.id
 LIMIT ?2
