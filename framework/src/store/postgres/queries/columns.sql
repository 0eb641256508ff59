e.event_id, e.aggregate_type, e.aggregate_id, e.sequence, e.position,
e.transaction_id::text AS txid, e.recorded_at, e.event_type, e.event_version,
e.payload::text AS payload, e.metadata::text AS metadata, e.correlation_id, e.causation_id
