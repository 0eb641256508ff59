-- Migration 1: the events table with a gap-safe global log.
--
-- Creates the table with every postgres-es column (same names, types and
-- meaning) when it does not exist, then adds Outflow's columns. On a database
-- that postgres-es has been writing to, the same statements number the
-- existing rows: positions follow the physical order of the rows (the order
-- they were inserted in, as far as PostgreSQL still knows it), re-dealt within
-- each stream so that every aggregate's events stay in sequence order.

CREATE TABLE IF NOT EXISTS {events} (
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

ALTER TABLE {events} ADD COLUMN IF NOT EXISTS position bigint;

WITH ranked AS (
    SELECT e.ctid AS row_id, e.aggregate_type, e.aggregate_id, e.sequence,
           row_number() OVER (ORDER BY e.ctid) AS physical_rank
      FROM {events} e
     WHERE e.position IS NULL
), slots AS (
    SELECT r.aggregate_type, r.aggregate_id, r.physical_rank,
           row_number() OVER (PARTITION BY r.aggregate_type, r.aggregate_id
                              ORDER BY r.physical_rank) AS k
      FROM ranked r
), in_sequence AS (
    SELECT r.row_id, r.aggregate_type, r.aggregate_id,
           row_number() OVER (PARTITION BY r.aggregate_type, r.aggregate_id
                              ORDER BY r.sequence) AS k
      FROM ranked r
)
UPDATE {events} AS e
   SET position = s.physical_rank
  FROM in_sequence q
  JOIN slots s ON s.aggregate_type = q.aggregate_type
              AND s.aggregate_id = q.aggregate_id
              AND s.k = q.k
 WHERE e.ctid = q.row_id;

ALTER TABLE {events} ALTER COLUMN position SET NOT NULL;
ALTER TABLE {events} ALTER COLUMN position ADD GENERATED ALWAYS AS IDENTITY;
SELECT setval(pg_get_serial_sequence('{events}', 'position'),
              (SELECT COALESCE(MAX(e.position), 0) + 1 FROM {events} e), false);

-- Rows written before this migration all carry this migration's transaction
-- id: they become visible to log readers together, in position order.
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS event_id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS recorded_at timestamptz NOT NULL DEFAULT statement_timestamp();
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS correlation_id uuid;
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS causation_id uuid;

-- The log order; each log batch is a range scan of this index.
CREATE UNIQUE INDEX IF NOT EXISTS {events_log_idx} ON {events} (transaction_id, position);
-- The log of one aggregate type (projections that want one type).
CREATE INDEX IF NOT EXISTS {events_type_log_idx} ON {events} (aggregate_type, transaction_id, position);

CREATE TABLE IF NOT EXISTS {snapshots} (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    version        bigint      NOT NULL CHECK (version > 0),
    payload        json        NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);
