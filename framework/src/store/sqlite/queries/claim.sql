-- Takes unit (`?1`, `?2`) for node `?3` at time `?4` (unix milliseconds)
-- when it is not stopped and no other node holds a valid lease on it (its
-- lease row is missing, released, expired, or this node's). The epoch is
-- bumped unless this node still holds a valid lease, which fences the
-- commits of any previous owner; a new epoch also clears the last error and
-- its kind (they belonged to the previous owner's attempt).
--
-- PostgreSQL skips a unit whose batch is in flight (its row is locked by
-- the batch's transaction). Here that cannot happen: a batch's transaction
-- holds SQLite's write lock from its first statement to its commit, and
-- this statement runs in a write transaction too, so it only ever sees a
-- unit between batches.
UPDATE {projections} AS p
   SET epoch = p.epoch + CASE WHEN EXISTS (
               SELECT 1 FROM {leases} l
                WHERE l.projection = p.projection AND l.partition = p.partition
                  AND l.owner = ?3 AND l.lease_until > ?4) THEN 0 ELSE 1 END,
       last_error = CASE WHEN EXISTS (
               SELECT 1 FROM {leases} l
                WHERE l.projection = p.projection AND l.partition = p.partition
                  AND l.owner = ?3 AND l.lease_until > ?4) THEN p.last_error ELSE NULL END,
       error_kind = CASE WHEN EXISTS (
               SELECT 1 FROM {leases} l
                WHERE l.projection = p.projection AND l.partition = p.partition
                  AND l.owner = ?3 AND l.lease_until > ?4) THEN p.error_kind ELSE NULL END,
       updated_at = ?5
 WHERE p.projection = ?1 AND p.partition = ?2 AND p.state <> 'stopped'
   AND NOT EXISTS (
       SELECT 1 FROM {leases} l
        WHERE l.projection = p.projection AND l.partition = p.partition
          AND l.owner <> ?3 AND l.lease_until >= ?4)
RETURNING epoch, transaction_id, position, paused
