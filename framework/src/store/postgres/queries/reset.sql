UPDATE {projections} AS p
   SET transaction_id = $3::text::xid8, position = $4, epoch = p.epoch + 1, processed = 0,
       rebuild_total = $2, state = 'catching_up', last_error = NULL, error_kind = NULL, updated_at = now()
 WHERE p.projection = $1
