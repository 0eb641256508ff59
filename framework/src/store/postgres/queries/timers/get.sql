SELECT {timer_columns} FROM {timers} WHERE key = $1
