-- Starts a batch: holds the unit's key (its epoch) until the batch ends, so a
-- claim or reset waits for the batch, while lease renewals do not.
SELECT 1 FROM {projections} p
 WHERE p.projection = $1 AND p.partition = $2 AND p.epoch = $3
   FOR KEY SHARE
