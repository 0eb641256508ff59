//! SQLite's group commit, with the writer held busy on purpose so that
//! appends queue behind it and go as one group: each caller gets its own
//! answer — a conflict or a claimed command id fails only its own append,
//! two appends for one stream at one version give one winner — and what
//! was answered as written is in the log, once, in order.

use outflow_tests as common;

use std::collections::HashSet;
use std::time::Duration;

use outflow::{
    AppendInTransaction, AppendRequest, EventLog, EventStore, LogFilter, StoreError, Transactional,
};

fn request(stream: &str, expected: u64, count: usize) -> AppendRequest {
    AppendRequest::new(
        "thing",
        stream,
        expected,
        (0..count)
            .map(|i| common::deposit_event(i as u64 + 1))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_answers_each_append_on_its_own() {
    let dir = common::TestDir::new("group_commit");
    let store = dir.sqlite().await;
    // A stream at version 1, and a command id already claimed.
    store.append(request("taken", 0, 1)).await.expect("seed");
    let claimed = uuid::Uuid::now_v7();
    store
        .append_command(request("claimed", 0, 1), claimed)
        .await
        .expect("claim");

    // Hold the writer: every append below queues behind it.
    let mut held = store.begin().await.expect("hold the writer");
    store
        .append_in(&mut held, request("held", 0, 1))
        .await
        .expect("append in the held transaction");
    let mut appends = Vec::new();
    for i in 0..24 {
        let store = store.clone();
        appends.push(tokio::spawn(async move {
            let result = match i % 4 {
                // A new stream each: written.
                0 => {
                    store
                        .append(request(&format!("new-{i}"), 0, 1 + i % 3))
                        .await
                }
                // A stale version: a conflict of its own.
                1 => store.append(request("taken", 0, 1)).await,
                // One stream for all of them, at version 0: one winner.
                2 => store.append(request("race", 0, 2)).await,
                // The claimed command id again, on its stream at its
                // version: refused by the claim, after the version passed.
                _ => {
                    store
                        .append_command(request("claimed", 1, 1), claimed)
                        .await
                }
            };
            (i, result)
        }));
    }
    // One leads (and waits for the writer); the 23 others queue behind it
    // and will go as one group.
    common::eventually("the appends queue", Duration::from_secs(60), || {
        let waiting = store.waiting_appends();
        async move {
            if waiting == 23 {
                Ok(())
            } else {
                Err(format!("{waiting} waiting"))
            }
        }
    })
    .await;
    store.commit(held).await.expect("release the writer");

    let mut written = HashSet::new();
    let mut race_winners = 0;
    for append in appends {
        let (i, result) = append.await.expect("an append panicked");
        match (i % 4, result) {
            (0, Ok(events)) => {
                assert_eq!(events.len(), 1 + i % 3);
                written.extend(events.iter().map(|e| e.event_id));
            }
            (1, Err(StoreError::Conflict { actual, .. })) => assert_eq!(actual, Some(1)),
            (2, Ok(events)) => {
                race_winners += 1;
                written.extend(events.iter().map(|e| e.event_id));
            }
            (2, Err(error)) => assert!(error.is_conflict(), "{error}"),
            (3, Err(error)) => assert!(error.is_conflict(), "{error}"),
            (kind, other) => panic!("append {i} (kind {kind}): {other:?}"),
        }
    }
    assert_eq!(race_winners, 1, "one append wins the race for a version");
    // What was answered as written is in the log once, each stream in order;
    // nothing of the refused appends is.
    let log = store
        .read_log(outflow::Checkpoint::START, &LogFilter::all(), 10_000)
        .await
        .expect("read the log");
    let ids: HashSet<_> = log.iter().map(|e| e.event_id).collect();
    assert!(written.is_subset(&ids));
    assert_eq!(log.len(), ids.len(), "no event twice");
    assert_eq!(
        log.iter().filter(|e| e.aggregate_id == "claimed").count(),
        1,
        "a refused claim writes nothing"
    );
    assert_eq!(log.iter().filter(|e| e.aggregate_id == "taken").count(), 1);
    let mut positions: Vec<u64> = log.iter().map(|e| e.position).collect();
    let sorted = {
        let mut p = positions.clone();
        p.sort_unstable();
        p
    };
    assert_eq!(positions, sorted, "log order is position order");
    positions.dedup();
    assert_eq!(positions.len(), log.len());
    let race = store
        .read_stream("thing", "race", 0, 10)
        .await
        .expect("read");
    assert_eq!(race.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2]);
    let head = store.head().await.expect("head");
    assert_eq!(head.position, log.last().expect("events").position);
}

/// The append leading the writer is cancelled while it waits for it (its
/// task aborted, as a dropped request would be): the appends queued behind
/// it are still written, and later appends are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_hands_the_writer_on() {
    let dir = common::TestDir::new("group_cancel");
    let store = dir.sqlite().await;
    let mut held = store.begin().await.expect("hold the writer");
    store
        .append_in(&mut held, request("held", 0, 1))
        .await
        .expect("append in the held transaction");
    // The leader: it takes the writer's turn and waits for the connection.
    let leader = tokio::spawn({
        let store = store.clone();
        async move { store.append(request("leader", 0, 1)).await }
    });
    // Four more queue behind it.
    let mut queued = Vec::new();
    for i in 0..4 {
        let store = store.clone();
        queued.push(tokio::spawn(async move {
            store.append(request(&format!("queued-{i}"), 0, 1)).await
        }));
    }
    common::eventually("the appends queue", Duration::from_secs(60), || {
        let waiting = store.waiting_appends();
        async move {
            if waiting == 4 {
                Ok(())
            } else {
                Err(format!("{waiting} waiting"))
            }
        }
    })
    .await;
    leader.abort();
    assert!(
        leader.await.is_err_and(|e| e.is_cancelled()),
        "the leader is cancelled"
    );
    store.commit(held).await.expect("release the writer");
    for append in queued {
        let written = tokio::time::timeout(Duration::from_secs(60), append)
            .await
            .expect("a queued append is answered")
            .expect("the task")
            .expect("written");
        assert_eq!(written.len(), 1);
    }
    // The writer is free: an append alone goes through.
    tokio::time::timeout(
        Duration::from_secs(60),
        store.append(request("after", 0, 1)),
    )
    .await
    .expect("not held up")
    .expect("written");
    assert_eq!(store.waiting_appends(), 0);
}
