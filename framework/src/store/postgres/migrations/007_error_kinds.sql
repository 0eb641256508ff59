-- Migration 7: whose fault a unit's last error is (`transient`,
-- `infrastructure`, `data`), kept beside its text so that status and waits
-- read the kind instead of parsing the message.
ALTER TABLE {projections} ADD COLUMN IF NOT EXISTS error_kind text;
