SELECT state FROM {timers} WHERE key = ?1
