-- The nodes whose recorded presence lock no session holds any more: their
-- process ended (its connections closed), so their leases count as expired.
(SELECT n.node FROM {nodes} n
  WHERE n.presence IS NOT NULL
    AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_locks k
         WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 1
           AND k.database = (SELECT d.oid FROM pg_catalog.pg_database d
                              WHERE d.datname = current_database())
           AND k.classid = ((n.presence >> 32) & 4294967295)::oid
           AND k.objid = (n.presence & 4294967295)::oid))
