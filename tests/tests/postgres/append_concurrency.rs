//! Optimistic concurrency under contention: 32 writers race for every version
//! of one stream; each version is won by exactly one, the others get a typed
//! conflict, and the stream has no lost or duplicate sequence.

use outflow_tests as common;

use std::sync::Arc;

use example_accounts::{BankAccount, BankCommand};
use outflow::{AppendRequest, CommandBus, CommandContext, EventStore, NewEvent, StoreError};
use serde_json::json;
use tokio::sync::Barrier;

const WRITERS: usize = 32;
const ROUNDS: u64 = 8;

fn request(writer: usize, expected_version: u64) -> AppendRequest {
    let mut event = NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Deposited".into(),
        event_version: "1.0".into(),
        payload: json!({ "Deposited": { "amount": writer } }),
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    };
    event.metadata.insert("writer".into(), writer.to_string());
    AppendRequest {
        aggregate_type: "account".into(),
        aggregate_id: "contended".into(),
        expected_version,
        events: vec![event],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_version_is_won_by_exactly_one_writer() {
    let db = common::TestDb::new("contention").await;
    let store = db.store().await;
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        // Every writer has "loaded" version `round`; the barrier releases them
        // together so their appends overlap on the server.
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let store = store.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                (writer, store.append(request(writer, round)).await)
            }));
        }
        let mut won = Vec::new();
        for task in tasks {
            let (writer, result) = task.await.expect("writer task");
            match result {
                Ok(written) => {
                    assert_eq!(written.len(), 1);
                    assert_eq!(written[0].sequence, round + 1);
                    won.push((writer, written[0].event_id));
                }
                Err(StoreError::Conflict {
                    aggregate_id,
                    expected,
                    ..
                }) => {
                    assert_eq!(aggregate_id, "contended");
                    assert_eq!(expected, round);
                }
                Err(other) => panic!("writer {writer}: unexpected error {other}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
        winners.push(won[0]);
    }
    let stream = store
        .read_stream("account", "contended", 0, 1000)
        .await
        .expect("read the stream");
    let sequences: Vec<u64> = stream.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=ROUNDS).collect::<Vec<_>>());
    for (event, (writer, event_id)) in stream.iter().zip(&winners) {
        assert_eq!(
            event.event_id, *event_id,
            "the stored event is the winner's"
        );
        assert_eq!(event.metadata["writer"], writer.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retrying_writers_all_get_through_without_losing_a_deposit() {
    let db = common::TestDb::new("retry").await;
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(db.store().await, ()));
    bus.execute(
        "acc",
        BankCommand::Open {
            owner: "Ann".into(),
        },
    )
    .await
    .expect("open");
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let bus = bus.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            bus.execute_retrying_with("acc", CommandContext::new(), 200, || BankCommand::Deposit {
                amount: 1,
            })
            .await
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        let committed = task.await.expect("task").expect("deposit gets through");
        versions.push(committed.version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=WRITERS as u64 + 1).collect::<Vec<_>>());
    let (account, version) = bus.load("acc").await.expect("load");
    assert_eq!(account.balance, WRITERS as i64);
    assert_eq!(version, WRITERS as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_retry_the_loser_sees_a_conflict() {
    let db = common::TestDb::new("noretry").await;
    let store = db.store().await;
    store.append(request(0, 0)).await.expect("first append");
    // A writer that loaded version 0 and appends after version 1 exists.
    match store.append(request(1, 0)).await {
        Err(error @ StoreError::Conflict { .. }) => {
            assert!(error.is_conflict() && error.is_retryable());
            assert!(error.to_string().contains("contended"), "{error}");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A writer claiming a version the stream never reached is refused too,
    // rather than leaving a gap in the stream.
    match store.append(request(2, 5)).await {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (5, Some(1))),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let stream = store
        .read_stream("account", "contended", 0, 10)
        .await
        .expect("read");
    assert_eq!(stream.len(), 1);
}
