-- Migration 10: event tags, for decisions across aggregates. An event's
-- tags are rows of their own, keyed by tag and then by the event's place in
-- the log, so the events matching a tag are one index range; events
-- without tags (every plain aggregate append) write nothing here.

CREATE TABLE IF NOT EXISTS {tags} (
    tag            text   NOT NULL,
    transaction_id xid8   NOT NULL,
    position       bigint NOT NULL,
    PRIMARY KEY (tag, transaction_id, position)
);
