-- Forgets a node (a clean stop: its leases were freed first).
DELETE
FROM {nodes}
WHERE node = ?1
