//! The messages this node read or wrote, kept per aggregate so that a
//! load asks only for what came after them (stored messages never change).

use std::collections::HashMap;
use std::sync::Arc;

use super::codec::*;

/// Every message of some aggregates up to a sequence, bounded by a count of
/// events.
pub(super) struct MessageCache {
    pub(super) streams: HashMap<(String, String), CachedStream>,
    pub(super) events: usize,
    pub(super) limit: usize,
}

/// A message kept in memory, with its stream sequence.
pub(super) type KeptMessage = (u64, Arc<StoredMessage>);

/// All messages of one aggregate with a stream sequence up to `last_seq`.
pub(super) struct CachedStream {
    pub(super) last_seq: u64,
    pub(super) messages: Vec<KeptMessage>,
}

impl MessageCache {
    pub(super) fn new(limit: usize) -> Self {
        MessageCache {
            streams: HashMap::new(),
            events: 0,
            limit,
        }
    }

    /// The kept messages after `after_seq` and the sequence they reach,
    /// when the aggregate is kept from before `after_seq`.
    pub(super) fn read(
        &self,
        key: &(String, String),
        after_seq: u64,
    ) -> Option<(Vec<KeptMessage>, u64)> {
        let cached = self.streams.get(key)?;
        (after_seq <= cached.last_seq).then(|| {
            let messages = cached
                .messages
                .iter()
                .filter(|(seq, _)| *seq > after_seq)
                .cloned()
                .collect();
            (messages, cached.last_seq)
        })
    }

    /// Adds messages read after `from_seq` (every message of the aggregate
    /// up to `reached`): kept when they continue what is kept, or start the
    /// aggregate's stream.
    pub(super) fn extend(
        &mut self,
        key: &(String, String),
        from_seq: u64,
        reached: u64,
        fresh: &[KeptMessage],
    ) {
        if self.limit == 0 {
            return;
        }
        let added: usize = fresh.iter().map(|(_, m)| m.events.len()).sum();
        if self.events + added > self.limit {
            self.streams.clear();
            self.events = 0;
        }
        match self.streams.get_mut(key) {
            Some(cached) if cached.last_seq == from_seq => {
                cached.messages.extend(fresh.iter().cloned());
                cached.last_seq = cached.last_seq.max(reached);
            }
            Some(_) => return,
            None if from_seq == 0 => {
                self.streams.insert(
                    key.clone(),
                    CachedStream {
                        last_seq: reached,
                        messages: fresh.to_vec(),
                    },
                );
            }
            None => return,
        }
        self.events += added;
    }
}
