-- Asks the nodes running projection $1 to rebuild it.
UPDATE {projections} AS p SET rebuild_requested_at = now() WHERE p.projection = $1
