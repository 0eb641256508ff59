-- Records a handled message; a message recorded already inserts nothing.
INSERT INTO {inbox} (handler, message_id, handled_at)
VALUES (?1, ?2, ?3)
ON CONFLICT (handler, message_id) DO NOTHING
