-- Records a node's heartbeat (`?2`: now, in unix milliseconds).
INSERT INTO {nodes} (node, last_seen)
VALUES (?1, ?2)
ON CONFLICT (node) DO UPDATE
SET last_seen = excluded.last_seen
