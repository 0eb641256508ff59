//! A long transaction: on a PostgreSQL server of the test's own (holding
//! the shared one back would stall every other test), a transaction that
//! took a transaction id stays open for 20 s (`OUTFLOW_LONG_TX_SECONDS`)
//! while an event is appended every 100 ms. All along the projection waits
//! (nothing passes the open transaction), and status names the holder and
//! counts every waiting event; once it ends, every event is delivered once,
//! in order, nothing skipped.

use outflow_tests as common;

use std::time::{Duration, Instant};

use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::{AppendRequest, Checkpoint, EventStore, NewEvent, PostgresStore, RecordedEvent};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// Records each event it sees.
struct Seen;

#[outflow::async_trait]
impl Projection<PostgresStore> for Seen {
    fn name(&self) -> &str {
        "seen"
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            sqlx::query("INSERT INTO seen (position) VALUES ($1)")
                .bind(event.position as i64)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query("CREATE TABLE IF NOT EXISTS seen (position bigint PRIMARY KEY)")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn seen(store: &PostgresStore) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM seen ORDER BY position")
        .fetch_all(store.pool())
        .await
        .expect("read seen")
}

async fn tick(store: &PostgresStore, version: u64) -> Checkpoint {
    store
        .append(AppendRequest {
            aggregate_type: "clock".into(),
            aggregate_id: "c".into(),
            expected_version: version,
            events: vec![NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "Ticked".into(),
                event_version: "1.0".into(),
                payload: json!({ "Ticked": { "n": version + 1 } }),
                metadata: Default::default(),
                correlation_id: None,
                causation_id: None,
            }],
        })
        .await
        .expect("append")[0]
        .checkpoint()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_held_for_20_seconds_delays_but_loses_nothing() {
    let hold = Duration::from_secs(
        std::env::var("OUTFLOW_LONG_TX_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let server = common::own_postgres::OwnPostgres::start_new();
    let store = {
        let mut connected = None;
        for _ in 0..100 {
            if let Ok(store) = PostgresStore::connect(&server.url()).await {
                connected = Some(store);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        connected.expect("connect to the test's own server")
    };
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(Seen))
        .build()
        .expect("a runner");
    let (shutdown, handle) = common::start_runner(&runner);
    let first = tick(&store, 0).await;
    runner
        .wait_for(first, &["seen"], Duration::from_secs(30))
        .await
        .expect("the first event");

    let mut holder = store.pool().begin().await.expect("begin");
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .expect("pid");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await
        .expect("take a transaction id");

    let held_since = Instant::now();
    let mut appended = 0u64;
    let mut last = first;
    let mut checks = 0;
    while held_since.elapsed() < hold {
        last = tick(&store, appended + 1).await;
        appended += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if appended.is_multiple_of(10) {
            let status = common::status_of(&runner, "seen").await;
            assert_eq!(
                status.held_back_by.as_ref().map(|tx| tx.pid),
                Some(holder_pid),
                "after {:?}: {status:?}",
                held_since.elapsed()
            );
            assert_eq!(status.lag_events, appended, "{status:?}");
            assert_eq!(
                seen(&store).await.len(),
                1,
                "an event passed the open transaction"
            );
            checks += 1;
        }
    }
    holder.rollback().await.expect("end the holder");
    runner
        .wait_for(last, &["seen"], Duration::from_secs(30))
        .await
        .expect("caught up once the transaction ended");
    let delivered = seen(&store).await;
    assert_eq!(delivered.len() as u64, appended + 1);
    assert!(delivered.windows(2).all(|w| w[0] < w[1]));
    let status = common::status_of(&runner, "seen").await;
    assert_eq!(status.lag_events, 0, "{status:?}");
    assert!(status.held_back_by.is_none(), "{status:?}");
    common::stop_runner(shutdown, handle).await;
    println!(
        "held {hold:?}: {appended} events waited, status checked {checks} times, all delivered once"
    );
}
