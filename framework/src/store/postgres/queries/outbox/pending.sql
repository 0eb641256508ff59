-- Messages not yet delivered (after the relay's cursor), counted up to $3,
-- and the age of the oldest, measured by the server's clock.
SELECT count(*)::bigint AS pending,
       EXTRACT(EPOCH FROM (now() - min(p.created_at)))::float8 AS oldest_age_seconds
  FROM (SELECT o.created_at
          FROM {outbox} o
         WHERE (o.transaction_id, o.id) > ($1::text::xid8, $2)
           AND o.delivered_at IS NULL
         LIMIT $3) p
