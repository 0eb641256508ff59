SELECT DISTINCT partitions FROM {projections} WHERE projection = $1
