//! The failures a user most likely causes: a read-model table that was never
//! created (the runner waits, says so in status, never parks, and goes on
//! once the table exists), a database whose Outflow tables were never
//! migrated (`run` returns an error instead of hanging), and a runner
//! configuration that cannot work (`build` refuses it).

use outflow_tests as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outflow::projection::{HandlerError, Projection, ProjectionOptions, RetryPolicy};
use outflow::runner::ProjectionRunner;
use outflow::store::{Checkpoints, ProjectionState};
use outflow::{
    AppendRequest, ConfigError, ErrorKind, EventStore, LogFilter, NewEvent, PostgresStore,
    RecordedEvent, StoreError,
};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use tokio::time::Instant;
use uuid::Uuid;

const EVENTS: usize = 20;

const SHORT_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    initial_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(200),
};

/// Inserts one row per event into `balances`, which the test creates late.
/// Counts its calls.
struct Balances {
    name: &'static str,
    calls: Arc<AtomicUsize>,
}

impl Balances {
    fn new(name: &'static str) -> Balances {
        Balances {
            name,
            calls: Arc::default(),
        }
    }
}

#[async_trait]
impl Projection<PostgresStore> for Balances {
    fn name(&self) -> &str {
        self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["wallet"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        for event in events {
            let amount = event.payload["amount"]
                .as_i64()
                .ok_or_else(|| HandlerError::msg(format!("no amount in {}", event.payload)))?;
            sqlx::query(
                "INSERT INTO balances (event_id, wallet, position, amount) VALUES ($1, $2, $3, $4)",
            )
            .bind(event.event_id)
            .bind(&event.aggregate_id)
            .bind(i64::try_from(event.position)?)
            .bind(amount)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

fn runner_builder(
    store: &PostgresStore,
) -> outflow::runner::ProjectionRunnerBuilder<PostgresStore> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_read_model_table_is_waited_for_never_parked_then_caught_up() {
    let db = common::TestDb::new("missing_read_model").await;
    let store = db.store().await;

    // 20 events over 4 wallets, one command each.
    let mut written: Vec<RecordedEvent> = Vec::new();
    for i in 0..EVENTS {
        let wallet = i % 4;
        let events = store
            .append(AppendRequest {
                aggregate_type: "wallet".into(),
                aggregate_id: format!("wallet-{wallet}"),
                expected_version: (i / 4) as u64,
                events: vec![NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: "Credited".into(),
                    event_version: "1.0".into(),
                    payload: json!({ "amount": i as i64 + 1 }),
                    metadata: Default::default(),
                    correlation_id: None,
                    causation_id: None,
                }],
            })
            .await
            .expect("append");
        written.extend(events);
    }
    assert_eq!(written.len(), EVENTS);
    let first = written[0].checkpoint();
    let last = written[EVENTS - 1].checkpoint();

    let balances = Balances::new("balances");
    let calls = balances.calls.clone();
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(balances).retry(SHORT_RETRY))
        .build()
        .expect("build the runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["balances"]).await;

    // The unit retries and says why, naming the kind and the table.
    let (status, _) = common::eventually(
        "the unit shows the missing table",
        Duration::from_secs(15),
        || async {
            let status = common::status_of(&runner, "balances").await;
            match (&status.state, &status.last_error) {
                (ProjectionState::Retrying, Some(error))
                    if error.contains("infrastructure") && error.contains("balances") =>
                {
                    Ok(status)
                }
                _ => Err(format!("{status:?}")),
            }
        },
    )
    .await;
    assert!(status.checkpoint < first, "{status:?}");

    // A caller waiting for the events hears why at once, not at its timeout.
    let waited = Instant::now();
    match runner
        .wait_for(last, &["balances"], Duration::from_secs(120))
        .await
    {
        Err(outflow::runner::WaitError::Failing {
            projection, error, ..
        }) => {
            assert_eq!(projection, "balances");
            assert!(error.contains("balances"), "{error}");
        }
        other => panic!("expected Failing, got {other:?}"),
    }
    assert!(
        waited.elapsed() < Duration::from_secs(60),
        "wait_for waited for its timeout"
    );

    // For 3 s it keeps retrying: nothing parked, the checkpoint stays before
    // the first event, the error stays visible.
    let observe_until = Instant::now() + Duration::from_secs(3);
    let mut checks = 0;
    while Instant::now() < observe_until {
        let parked = runner.dead_letters("balances").await.expect("dead letters");
        assert!(
            parked.is_empty(),
            "a missing table parked events: {parked:#?}"
        );
        let status = common::status_of(&runner, "balances").await;
        assert!(
            status.checkpoint < first,
            "the checkpoint moved past the first event: {status:?}"
        );
        assert_eq!(status.processed, 0, "{status:?}");
        assert_eq!(status.parked, 0, "{status:?}");
        assert_eq!(status.state, ProjectionState::Retrying, "{status:?}");
        let error = status.last_error.as_deref().unwrap_or_default();
        assert!(
            error.contains("infrastructure") && error.contains("balances"),
            "{status:?}"
        );
        checks += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(checks >= 5, "only {checks} checks in 3 s");
    // Far more attempts than the policy allows before parking (3 on the
    // batch, 3 on its first event alone).
    let attempts = calls.load(Ordering::SeqCst);
    assert!(
        attempts > 2 * SHORT_RETRY.max_attempts as usize,
        "only {attempts} attempts in 3 s of retrying"
    );

    // The fix: every event is applied once, in log order, and the unit is
    // live and error-free.
    sqlx::query(
        "CREATE TABLE balances (event_id uuid NOT NULL, wallet text NOT NULL, \
         position bigint NOT NULL, amount bigint NOT NULL)",
    )
    .execute(store.pool())
    .await
    .expect("create `balances`");
    let (status, _) = common::eventually(
        "every event applied after the table was created",
        Duration::from_secs(15),
        || async {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM balances")
                .fetch_one(store.pool())
                .await
                .map_err(|e| e.to_string())?;
            let status = common::status_of(&runner, "balances").await;
            if rows == EVENTS as i64
                && status.state == ProjectionState::Live
                && status.last_error.is_none()
                && status.checkpoint >= last
            {
                Ok(status)
            } else {
                Err(format!("{rows} rows; {status:?}"))
            }
        },
    )
    .await;
    assert_eq!(status.processed, EVENTS as u64, "{status:?}");
    assert_eq!(status.lag_events, 0, "{status:?}");
    assert_eq!(status.parked, 0, "{status:?}");
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT event_id, amount FROM balances ORDER BY position")
            .fetch_all(store.pool())
            .await
            .expect("read `balances`");
    let expected: Vec<(Uuid, i64)> = written
        .iter()
        .map(|e| (e.event_id, e.payload["amount"].as_i64().expect("amount")))
        .collect();
    assert_eq!(rows, expected);
    assert!(runner
        .dead_letters("balances")
        .await
        .expect("dead letters")
        .is_empty());

    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_returns_an_error_when_the_outflow_tables_are_missing() {
    let db = common::TestDb::new("missing_outflow_tables").await;
    let store = PostgresStore::builder(db.pool(5).await)
        .migrate(false)
        .build()
        .await
        .expect("build the store without migrating");
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Balances::new("balances")).retry(SHORT_RETRY))
        .build()
        .expect("build the runner");

    let shutdown = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(60), runner.run(shutdown.clone()))
        .await
        .expect("run returns within 60 s instead of hanging");
    let error = result.expect_err("run fails without Outflow's tables");
    assert_eq!(error.kind(), ErrorKind::Infrastructure, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("events_projections") && text.contains("does not exist"),
        "{text}"
    );
    assert!(
        !shutdown.is_cancelled(),
        "run returned on its own, not on shutdown"
    );
    // Nothing was created behind the user's back.
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(store.pool())
    .await
    .expect("count tables");
    assert_eq!(tables, 0, "run created tables");
    // `status` fails the same way instead of reporting nothing.
    let status = runner.status().await;
    assert!(
        matches!(&status, Err(e) if e.kind() == ErrorKind::Infrastructure),
        "{status:?}"
    );
    eprintln!("run returned after {:?}: {text}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_refuses_a_heartbeat_not_shorter_than_the_lease_and_duplicate_names() {
    let db = common::TestDb::new("runner_config").await;
    let store = db.store().await;

    // The control: a heartbeat shorter than the lease builds.
    ProjectionRunner::builder(store.clone())
        .lease_ttl(Duration::from_secs(2))
        .heartbeat_interval(Duration::from_millis(1999))
        .projection(ProjectionOptions::new(Balances::new("balances")))
        .build()
        .expect("a heartbeat shorter than the lease builds");

    for heartbeat in [Duration::from_secs(2), Duration::from_secs(3)] {
        let result = ProjectionRunner::builder(store.clone())
            .lease_ttl(Duration::from_secs(2))
            .heartbeat_interval(heartbeat)
            .projection(ProjectionOptions::new(Balances::new("balances")))
            .build();
        match result {
            Err(StoreError::Config(ConfigError::Invalid { setting, reason })) => {
                assert_eq!(setting, "heartbeat interval");
                assert!(reason.contains("shorter than the lease"), "{reason}");
            }
            other => {
                panic!("heartbeat {heartbeat:?}: expected ConfigError::Invalid, got {other:?}")
            }
        }
    }

    // Two projections of one name.
    let result = runner_builder(&store)
        .projection(ProjectionOptions::new(Balances::new("balances")))
        .projection(ProjectionOptions::new(Balances::new("other")))
        .projection(ProjectionOptions::new(Balances::new("balances")).batch_size(10))
        .build();
    match result {
        Err(StoreError::Config(ConfigError::DuplicateName(name))) => {
            assert_eq!(name, "balances");
        }
        other => panic!("expected ConfigError::DuplicateName, got {other:?}"),
    }

    // Nothing was registered by the refused builds.
    assert!(store
        .units(None)
        .await
        .expect("units")
        .iter()
        .all(|u| u.unit.projection != "balances"));
}
