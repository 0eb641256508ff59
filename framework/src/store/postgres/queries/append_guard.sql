-- The append's guard, shared by append.sql and append_one.sql ($1 aggregate
-- type, $2 aggregate id, $3 expected version): one probe of the primary key
-- reads the stream's last event; it must be at the expected version and
-- written by a transaction no newer than this one. A stream with no event
-- must be expected at 0.
COALESCE((SELECT e.sequence = $3 AND e.transaction_id <= pg_current_xact_id()
            FROM {events} e
           WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
           ORDER BY e.sequence DESC
           LIMIT 1),
         $3 = 0)
