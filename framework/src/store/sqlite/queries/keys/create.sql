-- A new subject's key; a subject with a row keeps it.
INSERT INTO {keys} (subject, key) VALUES (?1, ?2) ON CONFLICT (subject) DO NOTHING
