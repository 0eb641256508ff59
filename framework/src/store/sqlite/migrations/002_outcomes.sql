-- Migration 2: remembered command outcomes.
--
-- The outcome of each command sent with an id (`execute_once`): a claim
-- written with the command's events (`refusal` NULL), or a refusal or an
-- acceptance without events written alone; the first row wins.
-- `recorded_at` in microseconds since the Unix epoch.

CREATE TABLE IF NOT EXISTS {outcomes} (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    command_id     BLOB    NOT NULL,
    version        INTEGER NOT NULL CHECK (version >= 0),
    refusal        TEXT,
    refusal_json   TEXT,
    recorded_at    INTEGER NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, command_id)
);
CREATE INDEX IF NOT EXISTS {outcomes_idx} ON {outcomes} (recorded_at);
