-- Migration 12: a node's presence lock. A node records the key of a
-- session-level advisory lock it holds on a connection of its own; when no
-- session holds that key any more, the node's process is gone and its leases
-- may be claimed at once. A node that records none (an older version, or one
-- that could not hold a lock) is judged by its leases' time to live alone.

ALTER TABLE {nodes} ADD COLUMN IF NOT EXISTS presence bigint;
