//! Aggregates kept in memory after their commands, least recently used
//! evicted first, and when a snapshot is due.

/// Whether a command that took an aggregate from `version` to `new_version`
/// crossed a multiple of `every`, so a snapshot is due (a command of several
/// events may jump over the multiple itself).
pub(super) fn crosses_snapshot(version: u64, new_version: u64, every: u64) -> bool {
    every > 0 && version / every != new_version / every
}

/// Aggregates kept after their commands, least recently used evicted first.
pub(super) struct AggregateCache<A> {
    pub(super) capacity: usize,
    pub(super) entries: std::collections::HashMap<String, (A, u64, u64)>,
    pub(super) by_use: std::collections::BTreeMap<u64, String>,
    pub(super) tick: u64,
}

impl<A> AggregateCache<A> {
    pub(super) fn new(capacity: usize) -> Self {
        AggregateCache {
            capacity,
            entries: std::collections::HashMap::new(),
            by_use: std::collections::BTreeMap::new(),
            tick: 0,
        }
    }

    pub(super) fn take(&mut self, id: &str) -> Option<(A, u64)> {
        let (aggregate, version, tick) = self.entries.remove(id)?;
        self.by_use.remove(&tick);
        Some((aggregate, version))
    }

    pub(super) fn put(&mut self, id: &str, aggregate: A, version: u64) {
        if let Some((_, _, tick)) = self.entries.remove(id) {
            self.by_use.remove(&tick);
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.tick += 1;
        self.by_use.insert(self.tick, id.to_owned());
        self.entries
            .insert(id.to_owned(), (aggregate, version, self.tick));
    }
}
