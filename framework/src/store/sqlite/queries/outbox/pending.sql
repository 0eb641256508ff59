-- Messages not yet delivered after the relay's cursor, counted up to ?2, and
-- when the oldest of them was enqueued (microseconds since the Unix epoch).
SELECT count(*) AS pending, min(p.created_at) AS oldest
  FROM (SELECT o.created_at
          FROM {outbox} o
         WHERE o.id > ?1
           AND o.delivered_at IS NULL
         ORDER BY o.id
         LIMIT ?2) p
