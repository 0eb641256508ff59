-- Marks a delivered batch (its ids as a JSON array) with the time, in
-- microseconds since the Unix epoch.
UPDATE {outbox}
   SET delivered_at = ?1
 WHERE id IN (SELECT value FROM json_each(?2))
