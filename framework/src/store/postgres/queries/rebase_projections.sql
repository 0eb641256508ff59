-- Projection checkpoints and parked events move along with the log.
UPDATE {projections} AS p
   SET transaction_id = '0'::xid8
 WHERE p.transaction_id <> '0'::xid8;

UPDATE {dead_letters} AS d
   SET transaction_id = '0'::xid8
 WHERE d.transaction_id <> '0'::xid8;
