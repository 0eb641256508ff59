-- Records a unit's state and error for the holder of epoch `?3`; a row
-- already in that state is left alone (its `updated_at` keeps when the state
-- began).
UPDATE {projections}
SET state = ?4, last_error = ?5, updated_at = ?6, error_kind = ?7
WHERE projection = ?1
AND partition = ?2
AND epoch = ?3
AND (state IS NOT ?4 OR last_error IS NOT ?5 OR error_kind IS NOT ?7)
