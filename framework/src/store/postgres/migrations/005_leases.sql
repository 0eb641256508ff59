-- Migration 5: leases in a table of their own. A batch moves its unit's
-- checkpoint first and so holds the unit's row until it commits; lease
-- renewals write only here, so they never wait for a batch, and a batch that
-- takes longer than the lease does not lose it.

CREATE TABLE IF NOT EXISTS {leases} (
    projection  text        NOT NULL,
    partition   integer     NOT NULL,
    owner       text,
    lease_until timestamptz,
    PRIMARY KEY (projection, partition)
);

INSERT INTO {leases} (projection, partition, owner, lease_until)
SELECT p.projection, p.partition, p.owner, p.lease_until FROM {projections} p
ON CONFLICT (projection, partition) DO NOTHING;

ALTER TABLE {projections} DROP COLUMN IF EXISTS owner, DROP COLUMN IF EXISTS lease_until;
