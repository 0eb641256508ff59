-- The live nodes: those seen after `?2` (now minus the TTL), and `?1`, the
-- node that just beat, whatever its clock says.
SELECT n.node
FROM {nodes} n
WHERE n.node = ?1 OR n.last_seen > ?2
ORDER BY n.node
