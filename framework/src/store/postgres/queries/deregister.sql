-- A node's clean stop: its leases are freed and it no longer counts as
-- alive, so the nodes that remain (or a restarted process) take its share
-- at their next heartbeat.
WITH freed AS (
    UPDATE {leases} SET owner = NULL, lease_until = NULL WHERE owner = $1
)
DELETE FROM {nodes} WHERE node = $1
