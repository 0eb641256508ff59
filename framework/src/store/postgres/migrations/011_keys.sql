-- Migration 11: one key per data subject, for the personal values sealed
-- in events, snapshots and read models (crypto-shredding). Forgetting a
-- subject sets its key to NULL and records when: the row stays, so that no
-- new key is made for a forgotten subject.

CREATE TABLE IF NOT EXISTS {keys} (
    subject      text        PRIMARY KEY,
    key          bytea       NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    forgotten_at timestamptz NULL,
    CHECK ((key IS NULL) = (forgotten_at IS NOT NULL))
);
