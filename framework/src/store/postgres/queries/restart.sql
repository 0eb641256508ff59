UPDATE {projections} AS p
   SET state = 'idle', last_error = NULL, owner = NULL, lease_until = NULL, updated_at = now()
 WHERE p.projection = $1 AND p.state = 'stopped'
