-- Migration 5: a unit's epoch becomes part of a key, so that changing it (a
-- claim by another node, a reset) is a key update. A batch fences its unit
-- with FOR KEY SHARE: that waits out claims and resets, while the owner's
-- lease renewals (which change no key) never wait for a batch.

CREATE UNIQUE INDEX IF NOT EXISTS {projections_epoch_key} ON {projections} (projection, partition, epoch);
