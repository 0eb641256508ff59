-- The locks of a tagged or conditional append, taken in key order (so two
-- appends never wait on each other in a circle) and held to commit: $1 the
-- keys, $2 whether each is exclusive. A conditional append holds its
-- condition's keys exclusively; every append of tagged events holds its
-- tags' keys shared. A condition's check therefore runs when no writer of a
-- matching event is still in flight, and no such writer starts before it
-- commits. Returns the transaction's isolation level, which a condition
-- needs to be READ COMMITTED.
SELECT current_setting('transaction_isolation') AS isolation
  FROM (SELECT count(CASE WHEN k.exclusive THEN pg_advisory_xact_lock(k.key)::text
                          ELSE pg_advisory_xact_lock_shared(k.key)::text END) AS taken
          FROM (SELECT t.key, t.exclusive
                  FROM UNNEST($1::bigint[], $2::bool[]) AS t(key, exclusive)
                 ORDER BY t.key
                OFFSET 0) k) locked
