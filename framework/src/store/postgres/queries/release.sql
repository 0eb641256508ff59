UPDATE {leases} AS l
   SET owner = NULL, lease_until = NULL
  FROM {projections} p
 WHERE l.projection = $1 AND l.partition = $2 AND l.owner = $4
   AND p.projection = l.projection AND p.partition = l.partition AND p.epoch = $3
