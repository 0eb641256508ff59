-- Moves a unit's checkpoint from (`?4`, `?5`) to (`?6`, `?7`), only for the
-- holder of epoch `?3` and only from where it stands: a batch retried after
-- a commit whose acknowledgement was lost finds the checkpoint moved and
-- writes nothing.
UPDATE {projections}
SET transaction_id = ?6, position = ?7, processed = processed + ?8, updated_at = ?9
WHERE projection = ?1
AND partition = ?2
AND epoch = ?3
AND transaction_id = ?4
AND position = ?5
