-- Migration 3: the transactional outbox.
--
-- The transactional outbox: messages enqueued in the application's own
-- transactions, delivered by a relay in id order. SQLite runs one write
-- transaction at a time, so ids are handed out in commit order;
-- `AUTOINCREMENT` keeps an id from being reused after cleanup deleted the
-- newest rows (a reused id could sort behind the relay's cursor). Times in
-- microseconds since the Unix epoch.

CREATE TABLE IF NOT EXISTS {outbox} (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   BLOB    NOT NULL,
    key          TEXT    NOT NULL CHECK (key <> ''),
    topic        TEXT    NOT NULL CHECK (topic <> ''),
    payload      TEXT    NOT NULL,
    headers      TEXT    NOT NULL DEFAULT '{}',
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER
);
