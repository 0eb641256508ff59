WITH restarted AS (
    UPDATE {projections} AS p
       SET state = 'idle', last_error = NULL, error_kind = NULL, updated_at = now()
     WHERE p.projection = $1 AND p.state = 'stopped'
    RETURNING p.projection, p.partition
)
UPDATE {leases} AS l
   SET owner = NULL, lease_until = NULL
  FROM restarted r
 WHERE l.projection = r.projection AND l.partition = r.partition
