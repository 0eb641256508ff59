-- A write caused by an event that left the timer as it was (a schedule of
-- a key already pending, a cancel) still records that event as the
-- timer's latest cause: a replay of anything earlier then leaves it alone.
UPDATE {timers} SET source_tx = $2, source_pos = $3
WHERE key = $1 AND (source_tx IS NULL OR (source_tx, source_pos) < ($2, $3))
