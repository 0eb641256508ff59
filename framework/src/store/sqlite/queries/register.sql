-- Creates the missing state rows `0..?2` of projection `?1`. The `WHERE`
-- of the `SELECT` also keeps SQLite from reading `ON CONFLICT` as a join
-- constraint.
WITH RECURSIVE series(partition) AS (
    SELECT 0
    UNION ALL
    SELECT s.partition + 1 FROM series s WHERE s.partition + 1 < ?2
)
INSERT INTO {projections} (projection, partition, partitions, updated_at)
SELECT ?1, s.partition, ?2, ?3 FROM series s WHERE s.partition < ?2
ON CONFLICT (projection, partition) DO NOTHING
