-- The keys (NULL: forgotten) of the subjects asked for that have a row.
SELECT subject, key FROM {keys} WHERE subject = ANY($1)
