-- Migration 8: operators' requests that need a projection's code, made from
-- a process without it (the `outflow` command) and carried out by a running
-- node: a rebuild of a projection, a retry of a dead letter. The node that
-- carries one out clears it in the transaction that does the work.
ALTER TABLE {projections} ADD COLUMN IF NOT EXISTS rebuild_requested_at timestamptz;
ALTER TABLE {dead_letters} ADD COLUMN IF NOT EXISTS retry_requested_at timestamptz;
