-- The projections a rebuild is asked of.
SELECT DISTINCT p.projection FROM {projections} p WHERE p.rebuild_requested_at IS NOT NULL
