//! Group append on PostgreSQL, forced: two appends are held in flight (a
//! transaction left open holds the unique keys they need), so every append
//! after them waits and goes in a group. Each request still gets its own
//! answer — written, or a typed conflict with the stream's actual version
//! — the group's events share one transaction id, and every stream's events
//! stay in order in the log.

use outflow_tests as common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outflow::{AppendInTransaction, AppendRequest, Checkpoint, EventStore, LogFilter, StoreError};

fn request(id: &str, expected: u64, count: u64) -> AppendRequest {
    common::deposits("account", id, expected, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_appends_go_as_one_group_each_with_its_own_answer() {
    let db = common::TestDb::new("group").await;
    let store = db.store().await;
    // Streams that already have two events: a request expecting 0 on them
    // conflicts inside the group.
    for id in ["old-1", "old-2"] {
        store.append(request(id, 0, 2)).await.expect("seed");
    }

    // An open transaction writes the first event of `block-1` and
    // `block-2`: the two appends for them, the only two in flight, wait on
    // its unique keys.
    let mut blocker = store.pool().begin().await.expect("begin");
    for id in ["block-1", "block-2"] {
        store
            .append_in(&mut blocker, request(id, 0, 1))
            .await
            .expect("append in the blocking transaction");
    }
    let mut in_flight = Vec::new();
    for id in ["block-1", "block-2"] {
        let store = store.clone();
        in_flight.push(tokio::spawn(async move {
            store.append(request(id, 0, 1)).await
        }));
    }
    // Both are waiting on the server.
    common::eventually(
        "the two appends wait on the open transaction",
        Duration::from_secs(10),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(store.pool())
            .await
            .map_err(|e| e.to_string())?;
            if waiting == 2 {
                Ok(())
            } else {
                Err(format!("{waiting} waiting"))
            }
        },
    )
    .await;

    // Everything now queues: 20 new streams (one with three events), two
    // stale requests, and a second request for `new-0` expecting 0 (it must
    // wait for a later group and then conflict).
    let mut queued = Vec::new();
    for i in 0..20 {
        let count = if i == 7 { 3 } else { 1 };
        queued.push(request(&format!("new-{i}"), 0, count));
    }
    queued.push(request("old-1", 0, 1));
    queued.push(request("old-2", 1, 1));
    queued.push(request("new-0", 0, 1));
    let mut tasks = Vec::new();
    for r in queued {
        let store = store.clone();
        let id = r.aggregate_id.clone();
        tasks.push((id, tokio::spawn(async move { store.append(r).await })));
        // In arrival order.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    blocker.rollback().await.expect("release the two");
    for task in in_flight {
        let written = task.await.expect("task").expect("the held appends succeed");
        assert_eq!(written.len(), 1);
    }

    let mut transactions: HashMap<u64, HashSet<String>> = HashMap::new();
    let mut new_zero = 0;
    for (id, task) in tasks {
        match task.await.expect("task") {
            Ok(written) => {
                assert!(id.starts_with("new-"), "{id} was written");
                for (i, e) in written.iter().enumerate() {
                    assert_eq!(e.sequence, i as u64 + 1);
                    assert_eq!(e.aggregate_id, id);
                }
                if id == "new-7" {
                    assert_eq!(written.len(), 3);
                }
                if id == "new-0" {
                    new_zero += 1;
                }
                transactions
                    .entry(written[0].transaction_id)
                    .or_default()
                    .insert(id);
            }
            Err(StoreError::Conflict {
                aggregate_id,
                expected,
                actual,
                ..
            }) => match aggregate_id.as_str() {
                "old-1" => assert_eq!((expected, actual), (0, Some(2))),
                "old-2" => assert_eq!((expected, actual), (1, Some(2))),
                "new-0" => {
                    assert_eq!((expected, actual), (0, Some(1)));
                    new_zero += 1;
                }
                other => panic!("unexpected conflict on {other}"),
            },
            Err(other) => panic!("{id}: {other}"),
        }
    }
    assert_eq!(new_zero, 2, "both requests for new-0 were answered");
    // The waiting appends went in groups: some transaction wrote several
    // streams.
    let largest = transactions.values().map(HashSet::len).max().unwrap_or(0);
    assert!(largest >= 5, "groups: {transactions:?}");

    // The log: every event once, each stream in sequence order, each group's
    // events contiguous.
    let log = common::read_until(&store, Checkpoint::START, &LogFilter::all(), 4 + 2 + 22).await;
    assert_eq!(log.len(), 4 + 2 + 22, "{log:?}");
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in &log {
        let previous = last
            .insert(e.aggregate_id.as_str(), e.sequence)
            .unwrap_or(0);
        assert_eq!(e.sequence, previous + 1, "{e:?}");
    }
}
