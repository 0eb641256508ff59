//! Projection batches that commit without waiting for the flush
//! (`PostgresStoreBuilder::synchronous_projection_commits(false)`): the
//! batch's transaction runs with `synchronous_commit = off` (and only the
//! batch's: the default store's batches wait), and a server that crashes
//! (`pg_ctl stop -m immediate`) while batches commit this way loses them
//! whole — read-model rows with their checkpoint — so the runner applies
//! those events again and each ends in the read model exactly once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::store::DeadLetters;
use outflow::{EventLog, EventStore, PostgresStore, RecordedEvent, RetryPolicy, Transactional};
use outflow_tests as common;

type Tx = <PostgresStore as Transactional>::Transaction;

/// One row per event handled (a second one for the same event is a key
/// violation, not a silent double), with the batch's `synchronous_commit`.
struct Seen;

#[async_trait]
impl Projection<PostgresStore> for Seen {
    fn name(&self) -> &str {
        "seen"
    }

    async fn setup(&self, tx: &mut Tx) -> Result<(), HandlerError> {
        outflow::sqlx::query(
            "CREATE TABLE IF NOT EXISTS seen (event_id uuid PRIMARY KEY, setting text NOT NULL)",
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx) -> Result<(), HandlerError> {
        for event in events {
            outflow::sqlx::query(
                "INSERT INTO seen (event_id, setting) VALUES ($1, current_setting('synchronous_commit'))",
            )
            .bind(event.event_id)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

async fn settings_seen(store: &PostgresStore) -> Vec<String> {
    outflow::sqlx::query_scalar("SELECT DISTINCT setting FROM seen ORDER BY 1")
        .fetch_all(store.pool())
        .await
        .expect("read the settings")
}

/// Appends `count` events, projects them, and returns the settings the
/// batches ran with.
async fn project_with(store: PostgresStore, count: u64) -> Vec<String> {
    for i in 0..count {
        store
            .append(common::deposits("account", &format!("acc-{i}"), 0, 1))
            .await
            .expect("append");
    }
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(Seen))
        .build()
        .expect("a runner");
    let (stop, task) = common::start_runner(&runner);
    let head = store.committed_head().await.expect("the head");
    runner
        .wait_for(head, &["seen"], Duration::from_secs(60))
        .await
        .expect("the projection reaches the head");
    common::stop_runner(stop, task).await;
    settings_seen(&store).await
}

#[tokio::test]
async fn only_batches_of_a_store_that_asks_skip_the_flush() {
    let db = common::TestDb::new("sync_batches").await;
    let store = db.store().await;
    assert_eq!(project_with(store, 5).await, ["on"]);

    let db = common::TestDb::new("async_batches").await;
    let store = PostgresStore::builder(db.pool(8).await)
        .synchronous_projection_commits(false)
        .build()
        .await
        .expect("the store");
    assert_eq!(project_with(store.clone(), 5).await, ["off"]);
    // The setting was the batch's own: the pool's sessions keep theirs.
    let session: String = outflow::sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(store.pool())
        .await
        .expect("the session's setting");
    assert_eq!(session, "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loses_asynchronous_batches_whole() {
    let server = common::own_postgres::OwnPostgres::start_new();
    let pool = outflow::sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&server.url())
        .await
        .expect("connect to the test's own server");
    let store = PostgresStore::builder(pool)
        .synchronous_projection_commits(false)
        .build()
        .await
        .expect("the store");
    let patient = RetryPolicy {
        max_attempts: 100,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(500),
    };
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(Seen).batch_size(50).retry(patient))
        .build()
        .expect("a runner");
    let (runner_stop, runner_task) = common::start_runner(&runner);

    // A writer appends without pause, each event to a stream of its own;
    // appends that fail while the server is down are tried again later.
    let writing = Arc::new(AtomicBool::new(true));
    let written = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let store = store.clone();
        let writing = writing.clone();
        let written = written.clone();
        async move {
            let mut next = 0u64;
            while writing.load(Ordering::SeqCst) {
                let request = common::deposits("account", &format!("acc-{next}"), 0, 1);
                match store.append(request).await {
                    Ok(_) => {
                        next += 1;
                        written.fetch_add(1, Ordering::SeqCst);
                    }
                    // The attempt before committed after all (its
                    // acknowledgement was lost with the server): go on.
                    Err(error) if error.is_conflict() => {
                        next += 1;
                        written.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    });

    for crash in 0..3u64 {
        // Crash while the projection is live and committing batches.
        let before = written.load(Ordering::SeqCst);
        common::eventually(
            "the writer to append 300 more events",
            Duration::from_secs(120),
            || {
                let written = written.clone();
                async move {
                    let now = written.load(Ordering::SeqCst);
                    if now >= before + 300 {
                        Ok(now)
                    } else {
                        Err(format!("{now} written"))
                    }
                }
            },
        )
        .await;
        server.crash_and_start();
        eprintln!(
            "crash {crash} after {} events",
            written.load(Ordering::SeqCst)
        );
    }
    common::eventually(
        "the writer to append after the last crash",
        Duration::from_secs(120),
        || {
            let written = written.clone();
            let at = written.load(Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = written.load(Ordering::SeqCst);
                if now > at {
                    Ok(now)
                } else {
                    Err(format!("{now} written"))
                }
            }
        },
    )
    .await;
    writing.store(false, Ordering::SeqCst);
    writer.await.expect("the writer stops");

    let head = store.committed_head().await.expect("the head");
    runner
        .wait_for(head, &["seen"], Duration::from_secs(120))
        .await
        .expect("the projection reaches the head");
    common::stop_runner(runner_stop, runner_task).await;

    // Every event in the log is in the read model once (the key forbids
    // twice), and nothing else is.
    let (logged, seen, missing): (i64, i64, i64) = outflow::sqlx::query_as(
        "SELECT (SELECT count(*) FROM events),
                (SELECT count(*) FROM seen),
                (SELECT count(*) FROM events e WHERE NOT EXISTS
                    (SELECT 1 FROM seen s WHERE s.event_id = e.event_id))",
    )
    .fetch_one(store.pool())
    .await
    .expect("compare the log and the read model");
    assert_eq!(missing, 0, "events missing from the read model");
    assert_eq!(
        seen, logged,
        "the read model holds {seen} rows for {logged} events"
    );
    assert!(
        logged as u64 >= written.load(Ordering::SeqCst),
        "an acknowledged append is missing from the log"
    );
    let parked = store.dead_letters("seen").await.expect("the dead letters");
    assert!(parked.is_empty(), "events were parked: {parked:?}");
    assert_eq!(settings_seen(&store).await, ["off"]);
}
