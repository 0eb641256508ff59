-- Records this node as alive and returns every live node, this one included,
-- in id order (the fair share of units is computed from that order).
WITH beat AS (
    INSERT INTO {nodes} (node, last_seen) VALUES ($1, now())
    ON CONFLICT (node) DO UPDATE SET last_seen = now()
    RETURNING node
)
SELECT node FROM beat
UNION
SELECT n.node FROM {nodes} n WHERE n.last_seen > now() - make_interval(secs => $2)
ORDER BY 1
