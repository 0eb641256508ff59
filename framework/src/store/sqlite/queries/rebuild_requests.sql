-- The projections a rebuild is asked of.
SELECT DISTINCT projection FROM {projections} WHERE rebuild_requested_at IS NOT NULL
