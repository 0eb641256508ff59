-- Forgets the outcomes stored before an instant.
DELETE FROM {outcomes} WHERE recorded_at < $1
