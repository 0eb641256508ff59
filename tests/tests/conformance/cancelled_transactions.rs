//! Transactions whose callers are cancelled at any await point — a request
//! dropped by its client, a worker aborted in a crash — leave nothing
//! behind: a later append commits and every reader sees it. (On SQLite a
//! cancelled `BEGIN IMMEDIATE` once left the writer inside a transaction
//! nobody owned, and later appends were never committed.)

use outflow_tests as common;

use std::time::Duration;

use outflow::{AppendRequest, EventStore, Transactional};

async fn cancelled_begins_leave_nothing_open<S>(store: S)
where
    S: EventStore + Transactional + Clone,
{
    for round in 0..300u64 {
        // Cancel a `begin` (and sometimes a held transaction) after a
        // varying number of polls.
        let task = tokio::spawn({
            let store = store.clone();
            async move {
                let tx = store.begin().await;
                tokio::task::yield_now().await;
                drop(tx);
            }
        });
        for _ in 0..(round % 7) {
            tokio::task::yield_now().await;
        }
        if round % 3 == 0 {
            tokio::time::sleep(Duration::from_micros(round % 200)).await;
        }
        task.abort();
        let _ = task.await;

        let written = store
            .append(AppendRequest {
                aggregate_type: "probe".into(),
                aggregate_id: "p".into(),
                expected_version: round,
                events: vec![common::deposit_event(1)],
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: the append failed: {e}"));
        assert_eq!(written.len(), 1);
        let seen = store
            .read_stream("probe", "p", 0, usize::MAX)
            .await
            .expect("read the stream");
        assert_eq!(
            seen.len() as u64,
            round + 1,
            "round {round}: an acknowledged append is not visible to readers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_begins_on_sqlite() {
    let dir = common::TestDir::new("cancelled_begins");
    cancelled_begins_leave_nothing_open(dir.sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_begins_on_postgres() {
    let db = common::TestDb::new("cancelled_begins").await;
    cancelled_begins_leave_nothing_open(db.store().await).await;
}
