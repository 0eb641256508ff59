-- A new subject's key; a subject with a row keeps it (the caller reads it
-- back, after a concurrent creator committed).
INSERT INTO {keys} (subject, key) VALUES ($1, $2) ON CONFLICT (subject) DO NOTHING
