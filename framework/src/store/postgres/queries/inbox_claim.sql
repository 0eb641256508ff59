INSERT INTO {inbox} (handler, message_id) VALUES ($1, $2)
ON CONFLICT (handler, message_id) DO NOTHING
