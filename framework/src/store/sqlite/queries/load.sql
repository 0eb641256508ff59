-- A stream for a command in one statement (one state of the file): the
-- snapshot row (kind 0, when asked for), then the events after it (kind 1).
SELECT 0 AS kind, s.version AS sequence, NULL AS position, NULL AS event_type,
       NULL AS event_version, s.payload
  FROM {snapshots} s
 WHERE ?3 AND s.aggregate_type = ?1 AND s.aggregate_id = ?2
UNION ALL
SELECT 1, e.sequence, e.position, e.event_type, e.event_version, e.payload
  FROM {events} e
 WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2
   AND e.sequence > CASE WHEN ?3 THEN COALESCE(
           (SELECT s.version FROM {snapshots} s
             WHERE s.aggregate_type = ?1 AND s.aggregate_id = ?2), 0)
       ELSE 0 END
 ORDER BY kind, sequence
