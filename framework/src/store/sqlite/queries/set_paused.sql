-- Pauses (`?2` = 1) or resumes (`?2` = 0) every unit of projection `?1`.
UPDATE {projections}
SET paused = ?2, updated_at = ?3
WHERE projection = ?1
