SELECT COALESCE((SELECT o.transaction_id FROM {outbox} o
                  ORDER BY o.transaction_id DESC LIMIT 1) >= pg_current_xact_id(), false)
