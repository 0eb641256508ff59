SELECT key FROM {keys} WHERE subject = $1
