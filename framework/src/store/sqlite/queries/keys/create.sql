-- A new subject's key, or the key (NULL: forgotten) a subject already has.
INSERT INTO {keys} (subject, key) VALUES (?1, ?2)
ON CONFLICT (subject) DO UPDATE SET subject = excluded.subject
RETURNING key
