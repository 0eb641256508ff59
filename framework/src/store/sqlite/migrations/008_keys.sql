-- Migration 8: one key per data subject, for the personal values sealed
-- in events, snapshots and read models (crypto-shredding). Forgetting a
-- subject sets its key to NULL and records when: the row stays, so that no
-- new key is made for a forgotten subject.

CREATE TABLE IF NOT EXISTS {keys} (
    subject      TEXT    PRIMARY KEY,
    key          BLOB    NULL,
    created_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    forgotten_at TEXT    NULL,
    CHECK ((key IS NULL) = (forgotten_at IS NOT NULL))
);
