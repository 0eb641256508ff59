-- The nodes whose recorded presence lock no session holds any more: their
-- process ended (its connections closed), so their leases count as expired.
-- Asked of the lock manager for each recorded key rather than read from
-- pg_locks (which copies the whole lock table under every partition's lock,
-- a quarter of a millisecond on an idle server, and this runs with every
-- read of the units): a shared transaction-level lock on the key is granted
-- exactly when no session holds the node's exclusive session-level one. It
-- is released when the statement's transaction ends; a key is never used
-- again (each node draws a random one), so holding it a moment costs no one.
(SELECT n.node FROM {nodes} n
  WHERE n.presence IS NOT NULL
    AND pg_catalog.pg_try_advisory_xact_lock_shared(n.presence))
