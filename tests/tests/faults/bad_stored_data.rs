//! Bad rows written straight into PostgreSQL's events table, between good
//! ones, read by a typed projection: an unknown event type, a version whose
//! upcaster fails, metadata that is JSON `null` (read as no metadata), and
//! a valid payload of 5 MB. With the park policy each bad event is parked by
//! name after a few attempts (no hot loop: the handler's calls are counted),
//! the good ones — the 5 MB one included — are applied, and the projection
//! stays live; with
//! the stop policy the projection stops on the first bad event, naming it,
//! with the event before it applied.

use outflow_tests as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use example_accounts::{BankAccount, BankCommand};
use outflow::cqrs_es::persist::SerializedEvent;
use outflow::prelude::*;
use outflow::projection::ProjectionOptions;
use outflow::store::ProjectionState;
use outflow::upcast::{UpcastError, Upcaster};
use sqlx::{Postgres, Transaction};

/// Refuses every event of version 0.1.
struct Refuses01;

impl Upcaster for Refuses01 {
    fn name(&self) -> &str {
        "refuses-0.1"
    }
    fn can_upcast(&self, _event_type: &str, event_version: &str) -> bool {
        event_version == "0.1"
    }
    fn upcast(&self, _event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
        Err(UpcastError::new("version 0.1 has no known shape"))
    }
}

/// Records the position of each event it applies, in `table`.
struct Applied {
    table: &'static str,
    calls: Arc<AtomicUsize>,
}

#[async_trait]
impl EventHandler<BankAccount, PostgresStore> for Applied {
    fn name(&self) -> &str {
        self.table
    }

    async fn handle(
        &self,
        event: &Envelope<BankAccount>,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::AcqRel);
        sqlx::query(&format!(
            "INSERT INTO {} (position) VALUES ($1)",
            self.table
        ))
        .bind(event.position as i64)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (position bigint PRIMARY KEY)",
            self.table
        ))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

async fn applied(store: &PostgresStore, table: &str) -> Vec<u64> {
    sqlx::query_scalar::<_, i64>(&format!("SELECT position FROM {table} ORDER BY position"))
        .fetch_all(store.pool())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|p| p as u64)
        .collect()
}

/// Inserts a row as a careless tool would, returning its position.
async fn raw_row(
    store: &PostgresStore,
    sequence: i64,
    event_type: &str,
    event_version: &str,
    payload: &str,
    metadata: &str,
) -> u64 {
    let position: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('account', 'acc', $1, $2, $3, $4::json, $5::json) \
         RETURNING position",
    )
    .bind(sequence)
    .bind(event_type)
    .bind(event_version)
    .bind(payload)
    .bind(metadata)
    .fetch_one(store.pool())
    .await
    .expect("insert a raw row");
    position as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_parked_or_stop_the_projection_by_name() {
    let db = common::TestDb::new("bad_stored").await;
    let store = db.store().await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let open = bus
        .execute(
            "acc",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await
        .expect("open")
        .checkpoint()
        .expect("a checkpoint");
    let unknown = raw_row(
        &store,
        2,
        "InterestPaid",
        "1.0",
        r#"{"InterestPaid": {"amount": 5}}"#,
        "{}",
    )
    .await;
    let old = raw_row(
        &store,
        3,
        "Deposited",
        "0.1",
        r#"{"Deposited": {"cents": 5}}"#,
        "{}",
    )
    .await;
    let null_metadata = raw_row(
        &store,
        4,
        "Deposited",
        "1.0",
        r#"{"Deposited": {"amount": 6}}"#,
        "null",
    )
    .await;
    let memo = "m".repeat(5 * 1024 * 1024);
    let big = raw_row(
        &store,
        5,
        "Deposited",
        "1.0",
        &format!(r#"{{"Deposited": {{"amount": 7, "memo": "{memo}"}}}}"#),
        "{}",
    )
    .await;
    let last = raw_row(
        &store,
        6,
        "Deposited",
        "1.0",
        r#"{"Deposited": {"amount": 8}}"#,
        "{}",
    )
    .await;
    let bad = [unknown, old];

    let parking_calls = Arc::new(AtomicUsize::new(0));
    let stopping_calls = Arc::new(AtomicUsize::new(0));
    let quick = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    };
    let runner = ProjectionRunner::builder(store.clone())
        .projection(
            ProjectionOptions::new(
                typed(Applied {
                    table: "parking",
                    calls: parking_calls.clone(),
                })
                .with_upcasters(vec![Box::new(Refuses01)]),
            )
            .retry(quick)
            .on_error(OnError::Park),
        )
        .projection(
            ProjectionOptions::new(
                typed(Applied {
                    table: "stopping",
                    calls: stopping_calls.clone(),
                })
                .with_upcasters(vec![Box::new(Refuses01)]),
            )
            .retry(quick)
            .on_error(OnError::Stop),
        )
        .build()
        .expect("a runner");
    let (shutdown, handle) = common::start_runner(&runner);

    // Park: the good events applied, each bad one parked by name.
    let head = store.committed_head().await.expect("head");
    let parked = runner
        .wait_for(head, &["parking"], Duration::from_secs(30))
        .await;
    assert!(
        matches!(parked, Ok(()) | Err(WaitError::Parked { .. })),
        "{parked:?}"
    );
    let (letters, _) = common::eventually("two parked events", Duration::from_secs(30), || async {
        let letters = runner.dead_letters("parking").await.expect("dead letters");
        if letters.len() == 2 {
            Ok(letters)
        } else {
            Err(format!("{letters:?}"))
        }
    })
    .await;
    let parked_positions: Vec<u64> = letters.iter().map(|l| l.checkpoint.position).collect();
    assert_eq!(parked_positions, bad, "{letters:?}");
    assert!(
        letters[0].error.contains("InterestPaid"),
        "{}",
        letters[0].error
    );
    assert!(
        letters[1].error.contains("refuses-0.1"),
        "{}",
        letters[1].error
    );
    for letter in &letters {
        assert_eq!(letter.event.aggregate_id, "acc");
    }
    assert_eq!(
        applied(&store, "parking").await,
        [open.position, null_metadata, big, last]
    );
    // JSON `null` metadata (the column allows it) reads as no metadata.
    let logged = common::read_until(&store, Checkpoint::START, &LogFilter::all(), 6).await;
    let read = logged
        .iter()
        .find(|e| e.position == null_metadata)
        .expect("the row with null metadata");
    assert!(read.metadata.is_empty());
    let read_big = logged
        .iter()
        .find(|e| e.position == big)
        .expect("the 5 MB row");
    assert_eq!(
        read_big.payload["Deposited"]["memo"].as_str().map(str::len),
        Some(memo.len())
    );
    let status = common::status_of(&runner, "parking").await;
    assert_eq!(status.state, ProjectionState::Live, "{status:?}");
    // No hot loop: the handler ran for the good events (and retries of
    // batches that held a bad one), a bounded number of times.
    let calls = parking_calls.load(Ordering::Acquire);
    assert!(calls <= 30, "{calls} handler calls for 6 events");

    // Stop: stopped on the first bad event, naming it, the event before it
    // applied, nothing after it.
    let (status, _) = common::eventually(
        "the stopping projection stopped",
        Duration::from_secs(30),
        || async {
            let status = common::status_of(&runner, "stopping").await;
            if status.state == ProjectionState::Stopped {
                Ok(status)
            } else {
                Err(format!("{status:?}"))
            }
        },
    )
    .await;
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("InterestPaid") && error.contains(&format!("position {unknown}")),
        "{error}"
    );
    assert_eq!(applied(&store, "stopping").await, [open.position]);
    assert!(stopping_calls.load(Ordering::Acquire) <= 10);
    common::stop_runner(shutdown, handle).await;
}
