UPDATE {projections} AS p SET paused = $2, updated_at = now() WHERE p.projection = $1
