UPDATE {projections} AS p
   SET lease_until = now() + make_interval(secs => $2)
 WHERE p.owner = $1 AND p.lease_until >= now()
RETURNING p.projection, p.partition, p.epoch, p.transaction_id::text AS txid, p.position, p.paused
