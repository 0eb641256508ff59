-- One message in the caller's transaction. Refused (no row returned) when a
-- transaction newer than the caller's has already committed a message of the
-- same key: the caller's message would be delivered before that one although
-- it was enqueued after it committed. The caller retries its whole
-- transaction, which then gets a newer transaction id.
INSERT INTO {outbox} (message_id, key, topic, payload, headers)
SELECT $1, $2, $3, $4::json, $5::jsonb
 WHERE NOT EXISTS (SELECT 1 FROM {outbox} o
                    WHERE o.key = $2 AND o.transaction_id > pg_current_xact_id())
RETURNING id
