-- Which of a due batch are still pending (a cancel or reschedule may have
-- committed since the window was read), with their command ids.
SELECT key, command_id FROM {timers}
WHERE state = 'pending' AND key IN (SELECT value FROM json_each(?1))
