-- Gives a claimed unit's lease to node `?3` until `?4`.
INSERT INTO {leases} (projection, partition, owner, lease_until)
VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (projection, partition) DO UPDATE
SET owner = excluded.owner, lease_until = excluded.lease_until
