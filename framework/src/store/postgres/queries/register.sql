INSERT INTO {projections} (projection, partition, partitions)
SELECT $1, p, $2 FROM generate_series(0, $2 - 1) AS p
ON CONFLICT (projection, partition) DO NOTHING
