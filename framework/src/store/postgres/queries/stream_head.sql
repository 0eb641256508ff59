-- Why an append was refused: the stream's version, and whether its last
-- event was written by a transaction newer than the caller's.
SELECT e.sequence,
       COALESCE(e.transaction_id > pg_current_xact_id_if_assigned(), false) AS newer
  FROM {events} e
 WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
 ORDER BY e.sequence DESC
 LIMIT 1
