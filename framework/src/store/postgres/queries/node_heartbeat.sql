-- Records this node as alive and returns every live node, this one included,
-- in id order (the fair share of units is computed from that order). The
-- node's presence key ($3) is recorded only while a session holds its lock;
-- `present` tells the node whether it was. Another node whose recorded lock
-- no session holds is not live, however recent its last beat.
WITH mine AS (
    -- Held when a shared lock on the key is refused: another session (the
    -- node's presence connection) holds it exclusively.
    SELECT $3::bigint AS key,
           COALESCE(NOT pg_catalog.pg_try_advisory_xact_lock_shared($3::bigint), false) AS held
), beat AS (
    INSERT INTO {nodes} (node, last_seen, presence)
    SELECT $1, now(), CASE WHEN m.held THEN m.key END FROM mine m
    ON CONFLICT (node) DO UPDATE SET last_seen = now(), presence = EXCLUDED.presence
    RETURNING node, presence IS NOT NULL AS present
)
SELECT node, present FROM beat
UNION
SELECT n.node, false FROM {nodes} n
 WHERE n.last_seen > now() - make_interval(secs => $2)
   AND n.node <> $1
   AND n.node NOT IN {gone_nodes}
ORDER BY 1
