-- Deletes delivered messages older than ?1 (microseconds since the Unix
-- epoch) among the first ?2 rows in delivery order. Delivery marks rows in
-- that order, so the rows due for deletion are the first ones, and each call
-- reads at most ?2 rows however many messages are retained.
DELETE FROM {outbox}
 WHERE id IN (SELECT h.id
                FROM (SELECT o.id, o.delivered_at FROM {outbox} o ORDER BY o.id LIMIT ?2) h
               WHERE h.delivered_at < ?1)
