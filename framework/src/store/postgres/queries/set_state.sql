UPDATE {projections} AS p
   SET state = $4, last_error = $5, error_kind = $6, updated_at = now()
 WHERE p.projection = $1 AND p.partition = $2 AND p.epoch = $3
   AND (p.state IS DISTINCT FROM $4 OR p.last_error IS DISTINCT FROM $5
        OR p.error_kind IS DISTINCT FROM $6)
