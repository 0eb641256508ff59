-- Migration 4: dead letters of broker messages (outflow::relay).
--
-- A JetStream consumer parks a message here when its handler still fails
-- after the last delivery the consumer allows; the row commits together with
-- the message's inbox claim, so each message is either handled or parked,
-- once.

CREATE TABLE IF NOT EXISTS {dead_messages} (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer        text        NOT NULL,
    message_id      text        NOT NULL,
    stream          text        NOT NULL,
    stream_sequence bigint      NOT NULL,
    subject         text        NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}',
    payload         bytea       NOT NULL,
    deliveries      integer     NOT NULL,
    error           text        NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (consumer, message_id)
);
