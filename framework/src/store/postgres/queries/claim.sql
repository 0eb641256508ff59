-- Takes a unit that is free, whose lease ran out, or that this node holds.
-- A new owner gets a new epoch, which fences the previous owner's commits.
-- A unit whose batch is still running (its row is locked) is skipped, not
-- waited for: the claim is tried again at the next heartbeat.
WITH target AS (
    SELECT p.projection, p.partition
      FROM {projections} p
     WHERE p.projection = $1 AND p.partition = $2
       AND p.state <> 'stopped'
       AND (p.owner IS NULL OR p.lease_until IS NULL OR p.lease_until < now() OR p.owner = $3)
       FOR UPDATE SKIP LOCKED
)
UPDATE {projections} AS p
   SET owner = $3,
       epoch = CASE WHEN p.owner IS NOT DISTINCT FROM $3 AND p.lease_until > now()
                    THEN p.epoch ELSE p.epoch + 1 END,
       lease_until = now() + make_interval(secs => $4),
       updated_at = now()
  FROM target t
 WHERE p.projection = t.projection AND p.partition = t.partition
RETURNING p.epoch, p.transaction_id::text AS txid, p.position, p.paused
