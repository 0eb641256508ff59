//! What a node knows has been stored, so that a log reader can tell "nothing
//! new" from "not delivered to my consumer yet".
//!
//! A JetStream publish is acknowledged once the message is stored; the
//! stream tells its consumers about it afterwards, on a path of its own. A
//! reader that asks its consumer for messages without waiting (right after a
//! local append, or after another node's wake-up signal, on a busy server)
//! can be told "no messages" although the message is stored; the reader
//! would then sleep until the poll interval. So every append is announced:
//! in this process at once, to other nodes in the payload of the wake-up
//! signal (partition, aggregate type token, stream sequence). A read that
//! comes back short while an announced message of its subject lies beyond
//! what its consumer delivered waits for it briefly, and says it is held
//! back when it does not come.

use std::collections::HashMap;
use std::sync::Mutex;

/// One announced append: partition, the aggregate type's subject token and
/// the stream sequence of its message.
type Announcement = (u32, String, u64);

/// The last announced sequence per partition and aggregate type, and the
/// announcements not yet sent to other nodes.
#[derive(Debug, Default)]
pub(super) struct Announced {
    latest: Mutex<HashMap<(u32, String), u64>>,
    unsent: Mutex<HashMap<(u32, String), u64>>,
}

impl Announced {
    /// An append made here: known at once, and sent with the next signal.
    pub(super) fn appended(&self, partition: u32, type_token: &str, seq: u64) {
        self.note(partition, type_token, seq);
        if let Ok(mut unsent) = self.unsent.lock() {
            let entry = unsent
                .entry((partition, type_token.to_owned()))
                .or_default();
            *entry = (*entry).max(seq);
        }
    }

    /// The payload of the next wake-up signal: every append made here since
    /// the last one (at most one per partition and aggregate type).
    pub(super) fn take_unsent(&self) -> Vec<u8> {
        let unsent: Vec<Announcement> = match self.unsent.lock() {
            Ok(mut unsent) => unsent.drain().map(|((p, t), seq)| (p, t, seq)).collect(),
            Err(_) => Vec::new(),
        };
        serde_json::to_vec(&unsent).unwrap_or_default()
    }

    /// Another node's signal: what it announced is known here. A payload
    /// that does not parse (an older node sends none) announces nothing;
    /// the signal still wakes the readers.
    pub(super) fn received(&self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        if let Ok(announced) = serde_json::from_slice::<Vec<Announcement>>(payload) {
            for (partition, token, seq) in announced {
                self.note(partition, &token, seq);
            }
        }
    }

    /// The highest sequence announced in `partition`, for one aggregate
    /// type's token or for all of them (0 when none).
    pub(super) fn latest(&self, partition: u32, type_token: Option<&str>) -> u64 {
        let Ok(latest) = self.latest.lock() else {
            return 0;
        };
        match type_token {
            Some(token) => latest
                .get(&(partition, token.to_owned()))
                .copied()
                .unwrap_or(0),
            None => latest
                .iter()
                .filter(|((p, _), _)| *p == partition)
                .map(|(_, seq)| *seq)
                .max()
                .unwrap_or(0),
        }
    }

    fn note(&self, partition: u32, type_token: &str, seq: u64) {
        if let Ok(mut latest) = self.latest.lock() {
            let entry = latest
                .entry((partition, type_token.to_owned()))
                .or_default();
            *entry = (*entry).max(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_travel_in_the_signal_and_are_known_per_type_and_partition() {
        let writer = Announced::default();
        writer.appended(0, "account", 7);
        writer.appended(0, "account", 9);
        writer.appended(0, "user", 8);
        writer.appended(1, "account", 3);
        assert_eq!(writer.latest(0, None), 9);
        assert_eq!(writer.latest(0, Some("user")), 8);
        assert_eq!(writer.latest(2, None), 0);

        let reader = Announced::default();
        reader.received(&writer.take_unsent());
        assert_eq!(reader.latest(0, Some("account")), 9);
        assert_eq!(reader.latest(0, Some("user")), 8);
        assert_eq!(reader.latest(1, None), 3);
        // Sent once: the next signal carries only what came after.
        assert_eq!(writer.take_unsent(), b"[]");
        // An older node's empty payload, or garbage, announces nothing.
        reader.received(b"");
        reader.received(b"not json");
        assert_eq!(reader.latest(0, None), 9);
    }
}
