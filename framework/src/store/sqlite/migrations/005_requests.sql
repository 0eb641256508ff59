-- Migration 5: operators' requests that need a projection's code.
--
-- Made from a process without it (the `outflow` command) and carried out by
-- a running node: a rebuild of a projection, a retry of a dead letter (times
-- as text, as the tables' other times). The node that carries one out clears it in the
-- transaction that does the work.

ALTER TABLE {projections} ADD COLUMN rebuild_requested_at TEXT;
ALTER TABLE {dead_letters} ADD COLUMN retry_requested_at TEXT;
