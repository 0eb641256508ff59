-- name: register
INSERT INTO {projections} (projection, partition, partitions)
SELECT $1, p, $2 FROM generate_series(0, $2 - 1) AS p
ON CONFLICT (projection, partition) DO NOTHING

-- name: partition_counts
SELECT DISTINCT partitions FROM {projections} WHERE projection = $1

-- name: node_heartbeat
WITH beat AS (
    INSERT INTO {nodes} (node, last_seen) VALUES ($1, now())
    ON CONFLICT (node) DO UPDATE SET last_seen = now()
)
SELECT count(*)::bigint + CASE WHEN bool_or(n.node = $1) THEN 0 ELSE 1 END AS live
  FROM {nodes} n
 WHERE n.last_seen > now() - make_interval(secs => $2)

-- name: claim
-- Takes a unit that is free, whose lease ran out, or that this node holds.
-- A new owner gets a new epoch, which fences the previous owner's commits.
UPDATE {projections} AS p
   SET owner = $3,
       epoch = CASE WHEN p.owner IS NOT DISTINCT FROM $3 AND p.lease_until > now()
                    THEN p.epoch ELSE p.epoch + 1 END,
       lease_until = now() + make_interval(secs => $4),
       updated_at = now()
 WHERE p.projection = $1 AND p.partition = $2
   AND p.state <> 'stopped'
   AND (p.owner IS NULL OR p.lease_until IS NULL OR p.lease_until < now() OR p.owner = $3)
RETURNING p.epoch, p.transaction_id::text AS txid, p.position, p.paused

-- name: renew
UPDATE {projections} AS p
   SET lease_until = now() + make_interval(secs => $2)
 WHERE p.owner = $1 AND p.lease_until >= now()
RETURNING p.projection, p.partition, p.epoch, p.transaction_id::text AS txid, p.position, p.paused

-- name: release
UPDATE {projections} AS p
   SET owner = NULL, lease_until = NULL, updated_at = now()
 WHERE p.projection = $1 AND p.partition = $2 AND p.epoch = $3 AND p.owner = $4

-- name: save_checkpoint
-- Only the holder of the current epoch may move the checkpoint; the row lock
-- this takes also makes a concurrent claim wait for the batch to commit.
UPDATE {projections} AS p
   SET transaction_id = $4::text::xid8, position = $5,
       processed = p.processed + $6, updated_at = now()
 WHERE p.projection = $1 AND p.partition = $2 AND p.epoch = $3

-- name: set_state
UPDATE {projections} AS p
   SET state = $4, last_error = $5, updated_at = now()
 WHERE p.projection = $1 AND p.partition = $2 AND p.epoch = $3
   AND (p.state IS DISTINCT FROM $4 OR p.last_error IS DISTINCT FROM $5)

-- name: units
SELECT p.projection, p.partition, p.partitions, p.transaction_id::text AS txid, p.position,
       p.owner, COALESCE(p.lease_until >= now(), false) AS lease_valid, p.epoch, p.state,
       p.paused, p.last_error, p.processed, p.rebuild_total, p.updated_at
  FROM {projections} p
 WHERE $1::text IS NULL OR p.projection = $1
 ORDER BY p.projection, p.partition

-- name: reset
UPDATE {projections} AS p
   SET transaction_id = '0', position = 0, epoch = p.epoch + 1, processed = 0,
       rebuild_total = $2, state = 'catching_up', last_error = NULL, updated_at = now()
 WHERE p.projection = $1

-- name: set_paused
UPDATE {projections} AS p SET paused = $2, updated_at = now() WHERE p.projection = $1

-- name: restart
UPDATE {projections} AS p
   SET state = 'idle', last_error = NULL, owner = NULL, lease_until = NULL, updated_at = now()
 WHERE p.projection = $1 AND p.state = 'stopped'

-- name: park
INSERT INTO {dead_letters} (projection, partition, event_id, transaction_id, position,
                            aggregate_type, aggregate_id, sequence, event_type, event_version,
                            error, attempts, first_failed_at, last_failed_at)
VALUES ($1, $2, $3, $4::text::xid8, $5, $6, $7, $8, $9, $10, $11, $12, $13, now())

-- name: dead_letters
SELECT d.id, d.projection, d.partition, d.event_id, d.transaction_id::text AS txid, d.position,
       d.aggregate_type, d.aggregate_id, d.sequence, d.event_type, d.event_version,
       d.error, d.attempts, d.first_failed_at, d.last_failed_at
  FROM {dead_letters} d
 WHERE d.projection = $1
 ORDER BY d.id

-- name: take_dead_letter
DELETE FROM {dead_letters} AS d
 WHERE d.id = $1
RETURNING d.id, d.projection, d.partition, d.event_id, d.transaction_id::text AS txid, d.position,
          d.aggregate_type, d.aggregate_id, d.sequence, d.event_type, d.event_version,
          d.error, d.attempts, d.first_failed_at, d.last_failed_at

-- name: note_dead_letter_failure
UPDATE {dead_letters} AS d
   SET attempts = d.attempts + 1, error = $2, last_failed_at = now()
 WHERE d.id = $1

-- name: discard_dead_letter
DELETE FROM {dead_letters} AS d WHERE d.id = $1

-- name: event_at
SELECT {columns}
  FROM {events} e
 WHERE e.transaction_id = $1::text::xid8 AND e.position = $2

-- name: inbox_claim
INSERT INTO {inbox} (handler, message_id) VALUES ($1, $2)
ON CONFLICT (handler, message_id) DO NOTHING

-- name: oldest_transaction
SELECT a.pid, a.datname::text AS datname, a.state,
       EXTRACT(EPOCH FROM (now() - a.xact_start))::float8 AS age_seconds,
       left(a.query, 200) AS query
  FROM pg_stat_activity a
 WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
 ORDER BY a.xact_start
 LIMIT 1
