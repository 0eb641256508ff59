-- One message in the caller's transaction. SQLite runs one write
-- transaction at a time, so ids are handed out in commit order and no guard
-- is needed: a message can never overtake one of its key.
INSERT INTO {outbox} (message_id, key, topic, payload, headers, created_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
