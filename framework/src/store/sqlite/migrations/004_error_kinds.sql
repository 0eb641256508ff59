-- Migration 4: the kind of a unit's last error.
--
-- Whose fault a unit's last error is (`transient`, `infrastructure`,
-- `data`), kept beside its text so that status and waits read the kind
-- instead of parsing the message.

ALTER TABLE {projections} ADD COLUMN error_kind TEXT;
