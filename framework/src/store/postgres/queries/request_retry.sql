-- Asks the nodes running its projection to retry dead letter $1.
UPDATE {dead_letters} AS d SET retry_requested_at = now() WHERE d.id = $1
