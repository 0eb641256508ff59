-- Forgets a subject: its key deleted, the time recorded; a row for a
-- subject never seen, so that none is made later. Returns a row only when
-- the subject was not forgotten before.
INSERT INTO {keys} (subject, key, forgotten_at)
VALUES (?1, NULL, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
ON CONFLICT (subject) DO UPDATE SET key = NULL, forgotten_at = excluded.forgotten_at
  WHERE {keys}.forgotten_at IS NULL
RETURNING subject
