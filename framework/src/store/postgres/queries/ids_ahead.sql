-- Whether the log holds a transaction id at or above the current one: after
-- a restore into another cluster the ids restart lower, and the store
-- rebases before it appends.
SELECT COALESCE((SELECT e.transaction_id FROM {events} e
                  ORDER BY e.transaction_id DESC LIMIT 1) >= pg_current_xact_id(), false)
