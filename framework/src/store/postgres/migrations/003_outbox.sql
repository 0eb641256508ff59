-- Migration 3: the transactional outbox.
--
-- Applications enqueue messages in their own transactions, next to their own
-- rows; a relay delivers them in the gap-safe order of the event log:
-- `(transaction_id, id)`, reading only rows of transactions older than every
-- transaction still in flight, so a message whose transaction commits late is
-- never skipped and never overtaken by a later message of its key.

CREATE TABLE IF NOT EXISTS {outbox} (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    message_id     uuid        NOT NULL,
    key            text        NOT NULL CHECK (key <> ''),
    topic          text        NOT NULL CHECK (topic <> ''),
    payload        json        NOT NULL,
    headers        jsonb       NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT statement_timestamp(),
    delivered_at   timestamptz
);

-- The delivery order; each relay batch is a range scan of this index, and so
-- is the retention cleanup (delivered rows are the oldest in this order).
CREATE UNIQUE INDEX IF NOT EXISTS {outbox_log_idx} ON {outbox} (transaction_id, id);
-- The newest message of a key, for the enqueue guard.
CREATE INDEX IF NOT EXISTS {outbox_key_idx} ON {outbox} (key, transaction_id);
