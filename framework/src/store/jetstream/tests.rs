//! Unit tests of the pure parts: encodings, positions, classification,
//! the kept messages and the readers' tails.

use std::sync::Arc;

use chrono::Utc;
use uuid::Uuid;

use crate::error::ErrorKind;
use crate::event::{Metadata, RecordedEvent};

use super::cache::*;
use super::cluster::*;
use super::codec::*;
use super::errors::*;
use super::readers::*;

#[test]
fn leaders_spread_by_floor_and_ceiling() {
    let servers: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let led = |names: &[&str]| -> Vec<Option<String>> {
        names.iter().map(|n| Some(n.to_string())).collect()
    };
    // 4 partitions on 3 servers: 2/2/0 leaves a server idle while
    // another leads two more.
    assert_eq!(overloaded(&led(&["a", "a", "b", "b"]), &servers), Some(0));
    assert_eq!(overloaded(&led(&["a", "a", "b", "c"]), &servers), None);
    assert_eq!(
        overloaded(&led(&["a", "b", "c", "c", "c", "a"]), &servers),
        Some(2)
    );
    assert_eq!(
        overloaded(&led(&["a", "b", "c", "a", "b", "c"]), &servers),
        None
    );
    assert_eq!(overloaded(&led(&["a"]), &servers), None);
    assert_eq!(overloaded(&led(&["a", "a"]), &servers), Some(0));
}

#[test]
fn tokens_are_distinct_for_distinct_names() {
    let names = ["a.b", "a_b", "a b", "a*b", "a>b", "", "_", "é", "a-b", "A"];
    let tokens: std::collections::HashSet<String> = names.iter().map(|n| stream_token(n)).collect();
    assert_eq!(tokens.len(), names.len());
    for token in &tokens {
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{token}"
        );
    }
}

#[test]
fn positions_order_within_a_partition_and_name_it() {
    let a = position(7, 3, 0);
    let b = position(7, 3, 699);
    let c = position(8, 3, 0);
    assert!(a < b && b < c);
    assert_eq!(b - a, 699, "one append's events are consecutive");
    assert_eq!(partition_of_position(b), 3);
    assert_ne!(position(7, 2, 0), position(7, 3, 0));
}

#[test]
fn a_version_slot_has_one_id() {
    assert_eq!(slot_id("account", "a", 3), slot_id("account", "a", 3));
    assert_ne!(slot_id("account", "a", 3), slot_id("account", "a", 4));
    assert_ne!(slot_id("account", "a1", 3), slot_id("account", "a", 13));
    assert_ne!(slot_id("acc", "ount\0a", 3), slot_id("account", "a", 3));
}

#[test]
fn no_answer_is_unavailable_and_a_refusal_is_infrastructure() {
    let timeout = nats_error("x", "timed out: didn't receive ack in time");
    assert!(timeout.is_unavailable() && timeout.is_retryable());
    let refused = nats_error("x", "stream not found");
    assert!(!refused.is_unavailable());
    assert_eq!(refused.kind(), ErrorKind::Infrastructure);
    let single = nats_error("x", "replicas > 1 not supported in non-clustered mode");
    assert_eq!(single.kind(), ErrorKind::Infrastructure);
}

fn message(first: u64, events: usize) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        aggregate_type: "t".into(),
        aggregate_id: "i".into(),
        first,
        at: Utc::now(),
        writer: 1,
        events: (0..events)
            .map(|_| StoredEvent {
                id: Uuid::new_v4(),
                event_type: "E".into(),
                event_version: "1".into(),
                payload: serde_json::value::to_raw_value(&1).expect("raw"),
                metadata: Metadata::default(),
                correlation: None,
                causation: None,
            })
            .collect(),
    })
}

fn event_at(seq: u64, index: usize) -> RecordedEvent {
    let stored = message(1, index + 1);
    recorded_ref(&stored, seq, 0).expect("decode").remove(index)
}

#[test]
fn a_reader_keeps_the_tail_of_a_read_and_the_skipped_events_after_it() {
    let handed: Vec<RecordedEvent> = (1..=20).map(|seq| event_at(seq * 2, 0)).collect();
    let skipped: Vec<RecordedEvent> = (1..=20).map(|seq| event_at(seq * 2 + 1, 0)).collect();
    let recent = tail_of(&handed, skipped);
    let seqs: Vec<u64> = recent.iter().map(|e| e.transaction_id).collect();
    // The last 8 handed out (26..=40, even) and the skipped after 26.
    assert_eq!(seqs, (26..=41).collect::<Vec<_>>());
    let only_skipped = tail_of(&[], vec![event_at(3, 0), event_at(5, 0)]);
    assert_eq!(only_skipped.len(), 2);
}

#[test]
fn kept_messages_continue_only_what_is_kept() {
    let key = ("t".to_owned(), "i".to_owned());
    let mut cache = MessageCache::new(10);
    // Read from a snapshot (not from the start): not kept.
    cache.extend(&key, 5, 9, &[(9, message(3, 1))]);
    assert!(cache.read(&key, 0).is_none());
    // From the start: kept, and read after any kept sequence.
    cache.extend(&key, 0, 4, &[(2, message(1, 2)), (4, message(3, 1))]);
    let (kept, reached) = cache.read(&key, 0).expect("kept");
    assert_eq!((kept.len(), reached), (2, 4));
    let (after, _) = cache.read(&key, 2).expect("kept");
    assert_eq!(after.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4]);
    // A message that does not follow what is kept is not added.
    cache.extend(&key, 7, 8, &[(8, message(5, 1))]);
    assert_eq!(cache.read(&key, 0).expect("kept").1, 4);
    cache.extend(&key, 4, 8, &[(8, message(4, 1))]);
    assert_eq!(cache.read(&key, 0).expect("kept").1, 8);
    // Past the limit, everything is dropped.
    cache.extend(&key, 8, 9, &[(9, message(5, 20))]);
    assert!(cache.read(&key, 0).is_none());
}
