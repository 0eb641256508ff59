-- Takes the rebuild asked of projection $1, inside the transaction that
-- resets it: of two nodes, the second finds nothing to take.
UPDATE {projections} AS p SET rebuild_requested_at = NULL
 WHERE p.projection = $1 AND p.rebuild_requested_at IS NOT NULL
