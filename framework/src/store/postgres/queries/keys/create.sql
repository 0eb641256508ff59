-- A new subject's key, or the key (NULL: forgotten) a subject already has:
-- on a conflict the row is kept as it is and returned (after a concurrent
-- creator committed), in one round trip.
INSERT INTO {keys} (subject, key) VALUES ($1, $2)
ON CONFLICT (subject) DO UPDATE SET subject = EXCLUDED.subject
RETURNING key
