SELECT a.pid, a.datname::text AS datname, a.state,
       EXTRACT(EPOCH FROM (now() - a.xact_start))::float8 AS age_seconds,
       left(a.query, 200) AS query, a.query_start
  FROM pg_stat_activity a
 WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
 ORDER BY a.xact_start
 LIMIT 1
