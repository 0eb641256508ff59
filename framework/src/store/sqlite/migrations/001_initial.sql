-- Migration 1: the events log, snapshots, projection state, leases, nodes, dead letters and the inbox.
--
-- Positions are given by the store (the highest plus one, under the write
-- lock), never reused; `partition_hash` is the FNV-1a hash of the aggregate
-- id that partitioned projections filter on. An event's `recorded_at` is
-- in microseconds since the Unix epoch; other times are RFC 3339 text in UTC.

CREATE TABLE IF NOT EXISTS {events} (
    position       INTEGER PRIMARY KEY,
    transaction_id INTEGER NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence >= 0),
    event_type     TEXT    NOT NULL,
    event_version  TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    event_id       BLOB    NOT NULL,
    recorded_at    INTEGER NOT NULL,
    correlation_id BLOB,
    causation_id   BLOB,
    partition_hash INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS {events_stream_idx} ON {events} (aggregate_type, aggregate_id, sequence);
CREATE INDEX IF NOT EXISTS {events_type_idx} ON {events} (aggregate_type, position);

CREATE TABLE IF NOT EXISTS {snapshots} (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version > 0),
    payload        TEXT    NOT NULL,
    taken_at       TEXT    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

CREATE TABLE IF NOT EXISTS {projections} (
    projection     TEXT    NOT NULL,
    partition      INTEGER NOT NULL CHECK (partition >= 0),
    partitions     INTEGER NOT NULL CHECK (partitions > 0),
    transaction_id INTEGER NOT NULL DEFAULT 0,
    position       INTEGER NOT NULL DEFAULT 0,
    epoch          INTEGER NOT NULL DEFAULT 0,
    state          TEXT    NOT NULL DEFAULT 'idle',
    paused         INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    processed      INTEGER NOT NULL DEFAULT 0,
    rebuild_total  INTEGER,
    updated_at     TEXT    NOT NULL,
    PRIMARY KEY (projection, partition)
);

CREATE TABLE IF NOT EXISTS {leases} (
    projection  TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    owner       TEXT,
    lease_until INTEGER,
    PRIMARY KEY (projection, partition)
);

CREATE TABLE IF NOT EXISTS {nodes} (
    node      TEXT    PRIMARY KEY,
    last_seen INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS {dead_letters} (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    projection      TEXT    NOT NULL,
    partition       INTEGER NOT NULL,
    event_id        BLOB    NOT NULL,
    transaction_id  INTEGER NOT NULL,
    position        INTEGER NOT NULL,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    sequence        INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    event_version   TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    first_failed_at TEXT    NOT NULL,
    last_failed_at  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS {dead_letters_projection_idx} ON {dead_letters} (projection, id);

CREATE TABLE IF NOT EXISTS {inbox} (
    handler    TEXT NOT NULL,
    message_id TEXT NOT NULL,
    handled_at TEXT NOT NULL,
    PRIMARY KEY (handler, message_id)
);
