UPDATE {projections} AS p
   SET owner = NULL, lease_until = NULL, updated_at = now()
 WHERE p.projection = $1 AND p.partition = $2 AND p.epoch = $3 AND p.owner = $4
