-- Migration 6: the remembered outcome of each command sent with an id
-- (`execute_once`). A row is written in the transaction that appends the
-- command's events (a claim: `refusal` NULL) or alone for a refusal or an
-- acceptance without events; the first row for a command wins.

CREATE TABLE IF NOT EXISTS {outcomes} (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    command_id     uuid        NOT NULL,
    version        bigint      NOT NULL CHECK (version >= 0),
    refusal        text,
    refusal_json   json,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, command_id)
);

CREATE INDEX IF NOT EXISTS {outcomes_recorded_idx} ON {outcomes} (recorded_at);
