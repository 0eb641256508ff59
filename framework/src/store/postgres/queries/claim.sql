-- Takes a unit that is free, whose lease ran out, or that this node holds.
-- A claim without a valid lease of this node gets a new epoch, which fences
-- the previous owner's commits.
-- A new epoch also clears the last error: it belonged to the previous
-- owner's attempt, and this one has not failed yet.
-- A unit whose batch is in flight (its row is locked) is skipped, not waited
-- for: the claim is tried again at the next heartbeat.
-- A lease whose owner's presence lock is gone (its process ended) is free
-- at once, whatever its time to live says.
WITH unit AS (
    SELECT p.projection, p.partition,
           COALESCE(l.owner = $3 AND l.lease_until > now(), false) AS held
      FROM {projections} p
      LEFT JOIN {leases} l ON l.projection = p.projection AND l.partition = p.partition
     WHERE p.projection = $1 AND p.partition = $2
       AND p.state <> 'stopped'
       AND (l.owner IS NULL OR l.lease_until IS NULL OR l.lease_until < now() OR l.owner = $3
            OR l.owner IN {gone_nodes})
       FOR UPDATE OF p SKIP LOCKED
), claimed AS (
    UPDATE {projections} AS p
       SET epoch = CASE WHEN u.held THEN p.epoch ELSE p.epoch + 1 END,
           last_error = CASE WHEN u.held THEN p.last_error ELSE NULL END,
           error_kind = CASE WHEN u.held THEN p.error_kind ELSE NULL END,
           updated_at = now()
      FROM unit u
     WHERE p.projection = u.projection AND p.partition = u.partition
    RETURNING p.projection, p.partition, p.epoch, p.transaction_id, p.position, p.paused
), leased AS (
    INSERT INTO {leases} (projection, partition, owner, lease_until)
    SELECT c.projection, c.partition, $3, now() + make_interval(secs => $4) FROM claimed c
    ON CONFLICT (projection, partition)
    DO UPDATE SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until
)
SELECT c.epoch, c.transaction_id::text AS txid, c.position, c.paused FROM claimed c
