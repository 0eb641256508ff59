-- The keys (NULL: forgotten) of the subjects asked for (a JSON array) that
-- have a row.
SELECT subject, key FROM {keys} WHERE subject IN (SELECT value FROM json_each(?1))
