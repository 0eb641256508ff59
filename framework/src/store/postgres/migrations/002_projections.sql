-- Migration 2: projection state, nodes, dead letters and the inbox.

CREATE TABLE IF NOT EXISTS {projections} (
    projection      text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    partitions      integer     NOT NULL CHECK (partitions > 0),
    transaction_id  xid8        NOT NULL DEFAULT '0',
    position        bigint      NOT NULL DEFAULT 0,
    owner           text,
    epoch           bigint      NOT NULL DEFAULT 0,
    lease_until     timestamptz,
    state           text        NOT NULL DEFAULT 'idle',
    paused          boolean     NOT NULL DEFAULT false,
    last_error      text,
    processed       bigint      NOT NULL DEFAULT 0,
    rebuild_total   bigint,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, partition)
);

CREATE TABLE IF NOT EXISTS {nodes} (
    node      text        PRIMARY KEY,
    last_seen timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS {dead_letters} (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection      text        NOT NULL,
    partition       integer     NOT NULL,
    event_id        uuid        NOT NULL,
    transaction_id  xid8        NOT NULL,
    position        bigint      NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL,
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    error           text        NOT NULL,
    attempts        integer     NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS {dead_letters_projection_idx} ON {dead_letters} (projection, id);

CREATE TABLE IF NOT EXISTS {inbox} (
    handler    text        NOT NULL,
    message_id text        NOT NULL,
    handled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (handler, message_id)
);
