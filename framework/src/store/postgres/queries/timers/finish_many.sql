-- Records how a batch of firings ended, each only if its timer is still
-- pending with the command id it was fired with.
UPDATE {timers} AS t
SET state = f.state, last_error = f.note, finished_at = clock_timestamp()
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[]) AS f(key, command_id, state, note)
WHERE t.key = f.key AND t.command_id = f.command_id AND t.state = 'pending'
