DELETE FROM {dead_letters} AS d WHERE d.id = $1
