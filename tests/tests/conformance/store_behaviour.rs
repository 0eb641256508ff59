//! One behaviour suite, run against every event store backend: whatever the
//! backend, the same requests give the same answers.

use outflow_tests as common;
use outflow_tests::on_every_backend;

use outflow::{AppendRequest, Checkpoint, LogFilter, NewEvent, Snapshot, StoreError};
use serde_json::json;
use uuid::Uuid;

fn deposit(amount: i64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Deposited".into(),
        event_version: "1.0".into(),
        payload: json!({ "Deposited": { "amount": amount } }),
        metadata: [("source".to_owned(), "suite".to_owned())].into(),
        correlation_id: Some(Uuid::now_v7()),
        causation_id: None,
    }
}

fn opened(owner: &str) -> NewEvent {
    NewEvent {
        event_type: "AccountOpened".into(),
        payload: json!({ "AccountOpened": { "owner": owner } }),
        ..deposit(0)
    }
}

fn request(id: &str, expected: u64, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest {
        aggregate_type: "account".into(),
        aggregate_id: id.into(),
        expected_version: expected,
        events,
    }
}

async fn behaves_like_an_event_store<S: outflow::EventStore + outflow::EventLog>(store: S) {
    let all = LogFilter::all();
    // An empty store.
    assert_eq!(store.head().await.expect("head"), Checkpoint::START);
    assert!(store
        .read_log(Checkpoint::START, &all, 10)
        .await
        .expect("log")
        .is_empty());
    let nothing = store.load("account", "a", true).await.expect("load");
    assert!(nothing.snapshot.is_none() && nothing.events.is_empty());

    // Appends return what they wrote, with increasing positions.
    let first = request("a", 0, vec![opened("Ann"), deposit(5), deposit(7)]);
    let written = store.append(first.clone()).await.expect("append a");
    assert_eq!(written.len(), 3);
    for (i, (event, sent)) in written.iter().zip(&first.events).enumerate() {
        assert_eq!(event.sequence, i as u64 + 1);
        assert_eq!(event.event_id, sent.event_id);
        assert_eq!(event.payload, sent.payload);
        assert_eq!(event.metadata, sent.metadata);
        assert_eq!(event.correlation_id, sent.correlation_id);
        assert_eq!(event.aggregate_type, "account");
    }
    assert!(written
        .windows(2)
        .all(|w| w[0].checkpoint() < w[1].checkpoint()));
    assert!(
        written
            .iter()
            .all(|e| e.transaction_id == written[0].transaction_id),
        "one command's events are one transaction"
    );
    let b = store
        .append(request("b", 0, vec![opened("Bob")]))
        .await
        .expect("append b");
    assert!(b[0].checkpoint() > written[2].checkpoint());

    // Empty appends write nothing; invalid ones are refused with a typed error.
    assert!(store
        .append(request("a", 3, vec![]))
        .await
        .expect("empty")
        .is_empty());
    match store.append(request("", 0, vec![deposit(1)])).await {
        Err(StoreError::InvalidAppend { reason, .. }) => assert!(reason.contains("aggregate id")),
        other => panic!("expected InvalidAppend, got {other:?}"),
    }
    match store.append(request("a", 2, vec![deposit(1)])).await {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!(expected, 2);
            assert!(actual.is_none() || actual == Some(3));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    match store.append(request("a", 9, vec![deposit(1)])).await {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, Some(3)),
        other => panic!("expected Conflict, got {other:?}"),
    }
    // A stream with no event is at version 0: expecting more is a conflict,
    // and nothing is written (no stream may start with a gap).
    for events in [vec![deposit(1)], vec![deposit(1), deposit(2)]] {
        match store.append(request("empty", 2, events)).await {
            Err(StoreError::Conflict {
                expected, actual, ..
            }) => {
                assert_eq!(expected, 2);
                assert!(actual.is_none() || actual == Some(0), "{actual:?}");
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
    }
    assert!(store
        .read_stream("account", "empty", 0, 10)
        .await
        .expect("read")
        .is_empty());

    // Stream reads page by sequence.
    let page = store.read_stream("account", "a", 1, 1).await.expect("page");
    assert_eq!(page.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![2]);
    let rest = store
        .read_stream("account", "a", 2, 10)
        .await
        .expect("rest");
    assert_eq!(rest.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![3]);
    assert!(store
        .read_stream("account", "zzz", 0, 10)
        .await
        .expect("none")
        .is_empty());

    // The log: all four, filters applied by the store.
    let log = common::read_until(&store, Checkpoint::START, &all, 4).await;
    assert_eq!(log.len(), 4);
    let other_type = store
        .append(AppendRequest {
            aggregate_type: "loan".into(),
            ..request("l", 0, vec![deposit(9)])
        })
        .await
        .expect("append loan");
    let loans = common::read_until(
        &store,
        Checkpoint::START,
        &LogFilter::aggregate_types(["loan"]),
        1,
    )
    .await;
    assert_eq!(
        loans.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![other_type[0].event_id]
    );
    let deposits = store
        .read_log(
            Checkpoint::START,
            &LogFilter::all().with_event_types(["Deposited"]),
            100,
        )
        .await
        .expect("deposits");
    assert_eq!(deposits.len(), 3);
    let accounts_opened = store
        .read_log(
            Checkpoint::START,
            &LogFilter::aggregate_types(["account", "loan"]).with_event_types(["AccountOpened"]),
            100,
        )
        .await
        .expect("opened");
    assert_eq!(accounts_opened.len(), 2);
    let limited = store
        .read_log(Checkpoint::START, &all, 2)
        .await
        .expect("limit");
    assert_eq!(limited.len(), 2);
    assert_eq!(
        store.head().await.expect("head"),
        other_type[0].checkpoint()
    );

    // Snapshots: newer wins, older is ignored, load continues after it.
    let snapshot = |version: u64| Snapshot {
        aggregate_type: "account".into(),
        aggregate_id: "a".into(),
        version,
        state: json!({ "balance": version }),
    };
    store.save_snapshot(snapshot(2)).await.expect("save 2");
    store.save_snapshot(snapshot(1)).await.expect("save 1");
    let loaded = store.load("account", "a", true).await.expect("load");
    assert_eq!(loaded.snapshot, Some(snapshot(2)));
    assert_eq!(
        loaded.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![3]
    );
    let unsnapshotted = store.load("account", "a", false).await.expect("load all");
    assert!(unsnapshotted.snapshot.is_none());
    assert_eq!(unsnapshotted.events.len(), 3);
}

/// An append larger than one statement's worth of rows on any backend: all
/// or nothing, one transaction, contiguous positions and sequences.
async fn appends_a_large_batch_whole<S: outflow::EventStore + outflow::EventLog>(store: S) {
    store
        .append(request("big", 0, vec![opened("Big")]))
        .await
        .expect("open");
    let events: Vec<NewEvent> = (1..=700).map(deposit).collect();
    let written = store
        .append(request("big", 1, events.clone()))
        .await
        .expect("700 events in one append");
    assert_eq!(written.len(), 700);
    let first = written[0].position;
    for (i, (event, sent)) in written.iter().zip(&events).enumerate() {
        assert_eq!(event.sequence, i as u64 + 2);
        assert_eq!(event.position, first + i as u64);
        assert_eq!(event.transaction_id, written[0].transaction_id);
        assert_eq!(event.event_id, sent.event_id);
    }
    let logged = common::read_until(&store, Checkpoint::START, &LogFilter::all(), 701).await;
    assert_eq!(logged.len(), 701);
    assert_eq!(&logged[1..], &written[..]);
    // A stale append of as many events is refused and writes none of them.
    let stale = store
        .append(request("big", 1, (1..=700).map(deposit).collect()))
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::Conflict {
                actual: Some(701),
                ..
            })
        ),
        "{stale:?}"
    );
    let loaded = store.load("account", "big", false).await.expect("load");
    assert_eq!(loaded.events.len(), 701);
    assert_eq!(store.head().await.expect("head"), logged[700].checkpoint());
}

on_every_backend! {
    behaves_like_an_event_store: memory_store, postgres_store, sqlite_store;
    appends_a_large_batch_whole: large_memory, large_postgres, large_sqlite;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_store_on_one_server() {
    let store = common::jetstream_store(&common::nats_url(), "behaviour", 1).await;
    behaves_like_an_event_store(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_store_on_a_cluster() {
    let store = common::jetstream_store(&common::nats_cluster_url(), "behaviour", 1).await;
    behaves_like_an_event_store(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_jetstream() {
    let store = common::jetstream_store(&common::nats_url(), "large", 1).await;
    appends_a_large_batch_whole(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_in_a_schema_with_custom_tables() {
    let db = common::TestDb::new("custom").await;
    let pool = db.pool(10).await;
    sqlx::query("CREATE SCHEMA bank")
        .execute(&pool)
        .await
        .expect("schema");
    let store = outflow::PostgresStore::builder(pool.clone())
        .events_table("bank.ledger")
        .snapshots_table("bank.ledger_state")
        .build()
        .await
        .expect("store");
    behaves_like_an_event_store(store.clone()).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM bank.ledger")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 5);
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name = 'events'",
    )
    .fetch_one(&pool)
    .await
    .expect("tables");
    assert_eq!(tables, 0, "nothing was written to the default table");
}
