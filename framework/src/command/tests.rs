//! Unit tests of the bus's pure parts.

use super::cache::*;

#[test]
fn a_snapshot_is_due_when_a_command_crosses_a_multiple() {
    assert!(!crosses_snapshot(0, 99, 100));
    assert!(crosses_snapshot(99, 100, 100));
    assert!(crosses_snapshot(98, 103, 100), "jumped over 100");
    assert!(!crosses_snapshot(100, 101, 100), "just after one");
    assert!(crosses_snapshot(150, 350, 100));
    assert!(!crosses_snapshot(5, 9, 0), "snapshots off");
}

#[test]
fn the_cache_evicts_the_least_recently_used() {
    let mut cache = AggregateCache::new(2);
    cache.put("a", 'a', 1);
    cache.put("b", 'b', 1);
    // Using `a` again makes `b` the oldest.
    let (aggregate, version) = cache.take("a").expect("a cached");
    cache.put("a", aggregate, version + 1);
    cache.put("c", 'c', 1);
    assert!(cache.take("b").is_none(), "b was evicted");
    assert_eq!(cache.take("a"), Some(('a', 2)));
    assert_eq!(cache.take("c"), Some(('c', 1)));
    assert_eq!(cache.entries.len(), 0);
    assert!(cache.by_use.is_empty());
}

#[test]
fn a_taken_aggregate_is_gone_until_put_back() {
    let mut cache = AggregateCache::new(4);
    cache.put("a", 1u8, 3);
    assert_eq!(cache.take("a"), Some((1, 3)));
    assert_eq!(
        cache.take("a"),
        None,
        "a failed command leaves nothing stale"
    );
}
