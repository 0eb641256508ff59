-- Only the holder of the current epoch may move the checkpoint, and only from
-- where it stands: a batch retried after a commit whose acknowledgement was
-- lost finds the checkpoint moved and writes nothing. The first statement of a
-- batch: the unit's row stays locked until the batch commits, so a claim by
-- another node skips the unit and a reset waits for the batch (and neither can
-- deadlock with it: every transaction takes the unit's row before the read
-- model's).
UPDATE {projections} AS p
   SET transaction_id = $6::text::xid8, position = $7,
       processed = p.processed + $8, updated_at = now()
 WHERE p.projection = $1 AND p.partition = $2 AND p.epoch = $3
   AND p.transaction_id = $4::text::xid8 AND p.position = $5
