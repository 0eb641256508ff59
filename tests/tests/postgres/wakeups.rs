//! Log readers are woken after appends: at once in the writing process,
//! through one coalesced NOTIFY on other nodes, and again after their LISTEN
//! connection is killed. The poll interval is set to a minute so that only a
//! real signal can wake a reader within the test's timeouts.

use outflow_tests as common;

use outflow::EventLog;
use std::time::Duration;

use outflow::log::Wake;
use outflow::{AppendRequest, Checkpoint, EventStore, LogFilter, NewEvent, PostgresStore, Wakeups};
use serde_json::json;

const POLL: Duration = Duration::from_secs(60);

fn request(id: &str) -> AppendRequest {
    AppendRequest {
        aggregate_type: "account".into(),
        aggregate_id: id.into(),
        expected_version: 0,
        events: vec![NewEvent {
            event_id: uuid::Uuid::now_v7(),
            event_type: "AccountOpened".into(),
            event_version: "1.0".into(),
            payload: json!({ "AccountOpened": { "owner": id } }),
            metadata: Default::default(),
            correlation_id: None,
            causation_id: None,
        }],
    }
}

async fn node(db: &common::TestDb) -> PostgresStore {
    PostgresStore::builder(db.pool(5).await)
        .poll_interval(POLL)
        .build()
        .await
        .expect("store")
}

/// Consumes pending signals (a listener signals once when it connects).
async fn drain(wakeups: &mut Wakeups) {
    while tokio::time::timeout(Duration::from_millis(300), wakeups.wait())
        .await
        .is_ok()
    {}
}

async fn woken(wakeups: &mut Wakeups) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(20), wakeups.wait()).await,
        Ok(Wake::Signalled)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_wakes_readers_in_the_same_process() {
    let db = common::TestDb::new("wake_local").await;
    let store = node(&db).await;
    let mut wakeups = store.wakeups();
    drain(&mut wakeups).await;
    store.append(request("a")).await.expect("append");
    assert!(woken(&mut wakeups).await, "not woken by a local append");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_one_node_wakes_readers_on_another() {
    let db = common::TestDb::new("wake_remote").await;
    let writer = node(&db).await;
    let reader = node(&db).await;
    let mut wakeups = reader.wakeups();
    drain(&mut wakeups).await;
    writer.append(request("a")).await.expect("append");
    assert!(
        woken(&mut wakeups).await,
        "not woken by another node's append"
    );
    let seen = common::read_until(&reader, Checkpoint::START, &LogFilter::all(), 1).await;
    assert_eq!(seen[0].aggregate_id, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listen_connection_is_replaced() {
    let db = common::TestDb::new("wake_kill").await;
    let writer = node(&db).await;
    let reader = node(&db).await;
    let mut wakeups = reader.wakeups();
    drain(&mut wakeups).await;

    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(writer.pool())
    .await
    .expect("terminate the listener");
    assert_eq!(
        killed,
        vec![true],
        "exactly one LISTEN connection was killed"
    );

    // The listener reconnects and signals that it may have missed something.
    assert!(woken(&mut wakeups).await, "no signal after reconnecting");
    // Wait until the new LISTEN session is registered, then check it works.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(writer.pool())
        .await
        .expect("count listeners");
        if listening == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drain(&mut wakeups).await;
    writer.append(request("b")).await.expect("append");
    assert!(
        woken(&mut wakeups).await,
        "the new LISTEN session does not wake readers"
    );
}
