//! Failures that used to be silent, each forced on purpose: stored rows
//! that PostgreSQL accepts but `serde_json` refuses, a transaction held open
//! while later appends commit, a slow side effect, the state right after a
//! batch; and the first-week API around them (setup hook, view queries with
//! read-your-writes, `cqrs-es` queries, metadata, errors that print once).

use outflow_tests as common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_es::{EventEnvelope, Query};
use example_accounts::projections::AccountView;
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::error::error_chain;
use outflow::projection::{
    HandlerError, OnError, Projection, ProjectionOptions, QueryProjection, RetryPolicy,
};
use outflow::runner::{ProjectionRunner, WaitError};
use outflow::store::ProjectionState;
use outflow::view::ViewProjection;
use outflow::{
    AppendRequest, CommandBus, CommandError, EventStore, LogFilter, NewEvent, PostgresStore,
    RecordedEvent, StoreError,
};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

const QUICK_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 2,
    initial_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(50),
};

/// Writes the position of every `wallet` event it handles into
/// `seen_<name>`, a table its setup hook creates.
struct Seen {
    name: &'static str,
}

impl Seen {
    fn table(&self) -> String {
        format!("seen_{}", self.name)
    }
}

#[async_trait]
impl Projection<PostgresStore> for Seen {
    fn name(&self) -> &str {
        self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["wallet"])
    }

    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (position bigint PRIMARY KEY, wallet text NOT NULL)",
            self.table()
        ))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            sqlx::query(&format!(
                "INSERT INTO {} (position, wallet) VALUES ($1, $2)",
                self.table()
            ))
            .bind(i64::try_from(event.position)?)
            .bind(&event.aggregate_id)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(&format!("DELETE FROM {}", self.table()))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn seen(store: &PostgresStore, name: &str) -> Vec<u64> {
    sqlx::query_scalar::<_, i64>(&format!(
        "SELECT position FROM seen_{name} ORDER BY position"
    ))
    .fetch_all(store.pool())
    .await
    .unwrap_or_default()
    .into_iter()
    .map(|p| p as u64)
    .collect()
}

/// Appends one event (one command) to `aggregate`.
async fn credit(
    store: &PostgresStore,
    aggregate_type: &str,
    aggregate: &str,
    version: u64,
) -> RecordedEvent {
    let mut events = store
        .append(AppendRequest {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate.into(),
            expected_version: version,
            events: vec![NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "Credited".into(),
                event_version: "1".into(),
                payload: json!({ "amount": version + 1 }),
                metadata: Default::default(),
                correlation_id: None,
                causation_id: None,
            }],
        })
        .await
        .expect("append");
    events.pop().expect("one event")
}

fn runner_builder(
    store: &PostgresStore,
) -> outflow::runner::ProjectionRunnerBuilder<PostgresStore> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
}

/// The four kinds of stored JSON that PostgreSQL's `json` accepts and
/// `serde_json` refuses: (column, SQL text of the value).
fn corruptions() -> Vec<(&'static str, &'static str, String)> {
    vec![
        (
            "lone surrogate",
            "payload",
            r#"{"amount": 1, "note": "\ud800"}"#.to_owned(),
        ),
        (
            "number out of range",
            "payload",
            r#"{"amount": 1e400}"#.to_owned(),
        ),
        (
            "nesting 200 deep",
            "payload",
            format!(
                r#"{{"amount": 1, "deep": {}{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
        ),
        (
            "metadata of the wrong shape",
            "metadata",
            r#"{"user": 7}"#.to_owned(),
        ),
    ]
}

async fn corrupt(store: &PostgresStore, column: &str, value: &str, position: u64) {
    let updated = sqlx::query(&format!(
        "UPDATE {} SET {column} = $1::json WHERE position = $2",
        store.events_table()
    ))
    .bind(value)
    .bind(position as i64)
    .execute(store.pool())
    .await
    .expect("corrupt a row");
    assert_eq!(updated.rows_affected(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_rows_are_parked_by_name_and_their_neighbours_applied() {
    let db = common::TestDb::new("undecodable_park").await;
    let store = db.store().await;

    // Four wallets of three events each; the middle event of each is made
    // undecodable, one kind per wallet.
    let mut written = Vec::new();
    for version in 0..3 {
        for wallet in 0..4 {
            written.push(credit(&store, "wallet", &format!("w{wallet}"), version).await);
        }
    }
    let mut bad = Vec::new();
    for (wallet, (kind, column, value)) in corruptions().into_iter().enumerate() {
        let event = written
            .iter()
            .find(|e| e.aggregate_id == format!("w{wallet}") && e.sequence == 2)
            .expect("the middle event");
        corrupt(&store, column, &value, event.position).await;
        bad.push((kind, event.clone()));
    }
    let last = written.last().expect("events").checkpoint();

    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Seen { name: "park" }).retry(QUICK_RETRY))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["park"]).await;

    // Every good event applied, before and after the bad rows.
    let good: Vec<u64> = written
        .iter()
        .filter(|e| !bad.iter().any(|(_, b)| b.position == e.position))
        .map(|e| e.position)
        .collect();
    common::eventually(
        "the good events applied",
        Duration::from_secs(30),
        || async {
            let rows = seen(&store, "park").await;
            let status = common::status_of(&runner, "park").await;
            if rows == good && status.checkpoint >= last {
                Ok(())
            } else {
                Err(format!("{rows:?}; {status:?}"))
            }
        },
    )
    .await;

    // Each bad row parked once, named by its event.
    let parked = runner.dead_letters("park").await.expect("dead letters");
    assert_eq!(parked.len(), bad.len(), "{parked:#?}");
    for (kind, event) in &bad {
        let letter = parked
            .iter()
            .find(|d| d.event_id == event.event_id)
            .unwrap_or_else(|| panic!("{kind}: not parked: {parked:#?}"));
        assert_eq!(letter.event, event.event_ref(), "{kind}");
        assert_eq!(letter.checkpoint, event.checkpoint(), "{kind}");
        assert!(
            letter.error.contains("does not decode"),
            "{kind}: {letter:?}"
        );
    }
    let status = common::status_of(&runner, "park").await;
    assert_eq!(status.parked, bad.len(), "{status:?}");
    assert_eq!(status.lag_events, 0, "{status:?}");

    // Waiting for a bad event's own position reports it; so does waiting
    // for a later one while it was handled during the wait (checked by the
    // first call here: the projection started behind all of them).
    let (_, first_bad) = &bad[0];
    match runner
        .wait_for(first_bad.checkpoint(), &["park"], Duration::from_secs(10))
        .await
    {
        Err(WaitError::Parked {
            projection, event, ..
        }) => {
            assert_eq!(projection, "park");
            assert_eq!(event, first_bad.event_ref());
        }
        other => panic!("expected Parked, got {other:?}"),
    }
    // A later command of its own, with nothing parked: Ok.
    let fresh = credit(&store, "wallet", "w9", 0).await;
    runner
        .wait_for(fresh.checkpoint(), &["park"], Duration::from_secs(10))
        .await
        .expect("nothing parked for the new event");

    // Reading the stream of a bad row fails, naming the same event.
    let error = store
        .read_stream("wallet", "w0", 0, 10)
        .await
        .expect_err("w0 holds a bad row");
    match &error {
        StoreError::Undecodable { event, .. } => assert_eq!(**event, bad[0].1.event_ref()),
        other => panic!("expected Undecodable, got {other:?}"),
    }
    let text = error_chain(&error);
    assert!(
        text.contains("does not decode") && text.contains("escape"),
        "{text}"
    );

    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_row_stops_a_projection_whose_policy_is_stop() {
    let db = common::TestDb::new("undecodable_stop").await;
    let store = db.store().await;
    let mut written = Vec::new();
    for version in 0..3 {
        written.push(credit(&store, "wallet", "w", version).await);
    }
    corrupt(
        &store,
        "payload",
        r#"{"amount": 1e400}"#,
        written[1].position,
    )
    .await;

    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(Seen { name: "stop" })
                .retry(QUICK_RETRY)
                .on_error(OnError::Stop),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    let status =
        common::wait_for_status(&runner, "stop", |s| s.state == ProjectionState::Stopped).await;
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&written[1].event_ref().to_string()) && error.contains("does not decode"),
        "{status:?}"
    );
    assert_eq!(status.checkpoint, written[0].checkpoint(), "{status:?}");
    assert_eq!(seen(&store, "stop").await, vec![written[0].position]);
    assert!(runner
        .dead_letters("stop")
        .await
        .expect("dead letters")
        .is_empty());
    match runner
        .wait_for(written[2].checkpoint(), &["stop"], Duration::from_secs(10))
        .await
    {
        Err(WaitError::Stopped { projection, error }) => {
            assert_eq!(projection, "stop");
            assert!(error.contains("does not decode"), "{error}");
        }
        other => panic!("expected Stopped, got {other:?}"),
    }
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_names_the_open_transaction_that_committed_events_wait_behind() {
    let db = common::TestDb::new("held_back").await;
    let store = db.store().await;
    let first = credit(&store, "wallet", "w", 0).await;
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Seen { name: "held" }))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["held"]).await;
    runner
        .wait_for(first.checkpoint(), &["held"], Duration::from_secs(20))
        .await
        .expect("the first event");

    // A transaction that took a transaction id, held open on purpose.
    let mut holder = store.pool().begin().await.expect("begin");
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .expect("pid");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await
        .expect("take a transaction id");
    // 100 appends commit after it.
    let mut last = first.clone();
    for version in 1..=100 {
        last = credit(&store, "wallet", "w", version).await;
    }

    let (status, _) = common::eventually(
        "status shows the lag and its holder",
        Duration::from_secs(20),
        || async {
            let status = common::status_of(&runner, "held").await;
            match &status.held_back_by {
                Some(tx) if tx.pid == holder_pid && status.lag_events == 100 => Ok(status),
                _ => Err(format!("{status:?}")),
            }
        },
    )
    .await;
    assert_eq!(seen(&store, "held").await.len(), 1, "{status:?}");
    assert!(status.lag > Duration::ZERO, "{status:?}");
    let tx = status.held_back_by.expect("holder");
    assert_eq!(tx.state.as_deref(), Some("idle in transaction"), "{tx:?}");
    assert!(tx.query_start.is_some(), "{tx:?}");
    // wait_for does not call it reached.
    assert!(matches!(
        runner
            .wait_for(last.checkpoint(), &["held"], Duration::from_millis(500))
            .await,
        Err(WaitError::Timeout { .. })
    ));

    // The holder stays open (3 s; 20 s with OUTFLOW_SOAK=1) while appends
    // go on: all along, status names it and counts every waiting event, and
    // nothing passes it.
    let hold = if std::env::var_os("OUTFLOW_SOAK").is_some() {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(3)
    };
    let held_since = std::time::Instant::now();
    let mut appended = 100u64;
    while held_since.elapsed() < hold {
        last = credit(&store, "wallet", "w", appended + 1).await;
        appended += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if appended.is_multiple_of(5) {
            let status = common::status_of(&runner, "held").await;
            assert_eq!(
                status.held_back_by.as_ref().map(|tx| tx.pid),
                Some(holder_pid),
                "{status:?}"
            );
            assert_eq!(status.lag_events, appended, "{status:?}");
            assert_eq!(seen(&store, "held").await.len(), 1, "{status:?}");
        }
    }

    holder.rollback().await.expect("end the holder");
    runner
        .wait_for(last.checkpoint(), &["held"], Duration::from_secs(20))
        .await
        .expect("caught up once the transaction ended");
    let delivered = seen(&store, "held").await;
    assert_eq!(delivered.len() as u64, appended + 1);
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "each once, in order"
    );
    let status = common::status_of(&runner, "held").await;
    assert_eq!(status.lag_events, 0, "{status:?}");
    assert!(status.held_back_by.is_none(), "{status:?}");
    common::stop_runner(shutdown, handle).await;
}

/// A side effect that waits until the test opens its gate.
struct SlowMail {
    entered: Arc<Notify>,
    gate: Arc<Notify>,
    sent: Arc<Mutex<Vec<Uuid>>>,
}

#[async_trait]
impl Projection<PostgresStore> for SlowMail {
    fn name(&self) -> &str {
        "mail"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["mailbox"])
    }

    async fn effects(&self, events: &[RecordedEvent]) -> Result<(), HandlerError> {
        self.entered.notify_one();
        self.gate.notified().await;
        let mut sent = self
            .sent
            .lock()
            .map_err(|_| HandlerError::msg("poisoned"))?;
        sent.extend(events.iter().map(|e| e.event_id));
        Ok(())
    }

    async fn handle(
        &self,
        _events: &[RecordedEvent],
        _tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_side_effect_holds_no_transaction_and_delays_no_other_projection() {
    let db = common::TestDb::new("slow_effect").await;
    let store = db.store().await;
    let entered = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(SlowMail {
            entered: entered.clone(),
            gate: gate.clone(),
            sent: sent.clone(),
        }))
        .projection(ProjectionOptions::new(Seen { name: "other" }))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);

    let mail = credit(&store, "mailbox", "m", 0).await;
    tokio::time::timeout(Duration::from_secs(20), entered.notified())
        .await
        .expect("the effect started");
    // The effect is in progress (and stays so until the gate opens): a later
    // event of another projection is handled meanwhile.
    let wallet = credit(&store, "wallet", "w", 0).await;
    runner
        .wait_for(wallet.checkpoint(), &["other"], Duration::from_secs(20))
        .await
        .expect("the other projection is not held back by the effect");
    let status = common::status_of(&runner, "other").await;
    assert!(status.held_back_by.is_none(), "{status:?}");
    assert!(sent.lock().expect("lock").is_empty(), "the gate is closed");

    gate.notify_one();
    runner
        .wait_for(mail.checkpoint(), &["mail"], Duration::from_secs(20))
        .await
        .expect("the mail projection finishes once its effect returns");
    assert_eq!(*sent.lock().expect("lock"), vec![mail.event_id]);
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_state_is_live_as_soon_as_wait_for_returns() {
    let db = common::TestDb::new("state_after_batch").await;
    let store = db.store().await;
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Seen { name: "state" }))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    for version in 0..16 {
        let event = credit(&store, "wallet", "w", version).await;
        runner
            .wait_for(event.checkpoint(), &["state"], Duration::from_secs(20))
            .await
            .expect("wait");
        let status = common::status_of(&runner, "state").await;
        assert_eq!(
            status.state,
            ProjectionState::Live,
            "read {version}: {status:?}"
        );
    }
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn setup_creates_the_read_model_and_a_rebuild_hands_over_without_waiting_for_a_heartbeat() {
    let db = common::TestDb::new("setup_rebuild").await;
    let store = db.store().await;
    let mut last = None;
    for version in 0..4 {
        last = Some(credit(&store, "wallet", "w", version).await);
    }
    let last = last.expect("events");
    // Heartbeats far apart: a handover that waited for one would take 30 s.
    let runner = ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_secs(30))
        .lease_ttl(Duration::from_secs(90))
        .projection(ProjectionOptions::new(Seen { name: "setup" }))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    // The table did not exist: setup created it before the first batch.
    runner
        .wait_for(last.checkpoint(), &["setup"], Duration::from_secs(20))
        .await
        .expect("caught up");
    assert_eq!(seen(&store, "setup").await.len(), 4);

    // Someone drops the read model; a rebuild sets it up again and refills it.
    sqlx::query("DROP TABLE seen_setup")
        .execute(store.pool())
        .await
        .expect("drop");
    let mut progress = runner.rebuild("setup").await.expect("rebuild starts");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !progress.borrow().is_complete() {
            progress.changed().await.expect("progress");
        }
    })
    .await
    .expect("the rebuild completes without waiting for the next heartbeat");
    runner
        .wait_for(last.checkpoint(), &["setup"], Duration::from_secs(10))
        .await
        .expect("rebuilt");
    assert_eq!(seen(&store, "setup").await.len(), 4);
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_query_handle_reads_its_writes() {
    let db = common::TestDb::new("view_query").await;
    let store = db.store().await;
    let view = ViewProjection::<BankAccount, AccountView>::new("account_view", "account_view")
        .expect("view");
    // The handle outlives the projection's move into the runner, and clones.
    let query = view.query(&store).clone();
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(view))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    bus.execute(
        "acc-1",
        BankCommand::Open {
            owner: "ann".into(),
        },
    )
    .await
    .expect("open");
    let done = bus
        .execute("acc-1", BankCommand::Deposit { amount: 250 })
        .await
        .expect("deposit");
    let view = query
        .load_after(done.checkpoint(), "acc-1", Duration::from_secs(20))
        .await
        .expect("read after the deposit")
        .expect("the view exists");
    assert_eq!((view.owner.as_str(), view.balance), ("ann", 250));
    assert_eq!(query.load("nobody").await.expect("load"), None);
    common::stop_runner(shutdown, handle).await;
}

/// One dispatch: the aggregate id and the sequences of its events.
type Dispatch = (String, Vec<usize>);

/// Records each dispatch.
#[derive(Clone, Default)]
struct Dispatches(Arc<Mutex<Vec<Dispatch>>>);

#[async_trait]
impl Query<BankAccount> for Dispatches {
    async fn dispatch(&self, aggregate_id: &str, events: &[EventEnvelope<BankAccount>]) {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((
                aggregate_id.to_owned(),
                events.iter().map(|e| e.sequence).collect(),
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cqrs_es_query_runs_as_a_projection_once_per_command() {
    let db = common::TestDb::new("cqrs_query").await;
    let store = db.store().await;
    let event = |payload: BankEvent| NewEvent {
        event_id: Uuid::now_v7(),
        event_type: cqrs_es::DomainEvent::event_type(&payload),
        event_version: "1.0".into(),
        payload: serde_json::to_value(&payload).expect("json"),
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    };
    // Two events in one command, then one each on two accounts.
    store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "a".into(),
            expected_version: 0,
            events: vec![
                event(BankEvent::AccountOpened {
                    owner: "ann".into(),
                }),
                event(BankEvent::Deposited { amount: 5 }),
            ],
        })
        .await
        .expect("append");
    store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "b".into(),
            expected_version: 0,
            events: vec![event(BankEvent::AccountOpened {
                owner: "bob".into(),
            })],
        })
        .await
        .expect("append");
    let last = store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "a".into(),
            expected_version: 2,
            events: vec![event(BankEvent::Withdrawn { amount: 5 })],
        })
        .await
        .expect("append");
    let dispatches = Dispatches::default();
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(QueryProjection::new(
            "audit",
            dispatches.clone(),
        )))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    runner
        .wait_for(last[0].checkpoint(), &["audit"], Duration::from_secs(20))
        .await
        .expect("dispatched");
    let seen = dispatches.0.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![
            ("a".to_owned(), vec![1, 2]),
            ("b".to_owned(), vec![1]),
            ("a".to_owned(), vec![3]),
        ]
    );
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_written_and_errors_print_each_message_once() {
    let db = common::TestDb::new("metadata_errors").await;
    let store = db.store().await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let metadata = HashMap::from([("user".to_owned(), "ann".to_owned())]);
    let done = bus
        .execute_with_metadata(
            "acc",
            BankCommand::Open {
                owner: "ann".into(),
            },
            metadata.clone(),
        )
        .await
        .expect("open");
    assert_eq!(done.events[0].metadata, metadata);
    let stored = store
        .read_stream("account", "acc", 0, 10)
        .await
        .expect("read");
    assert_eq!(stored[0].metadata, metadata);

    // A rejection: the aggregate's message appears once in the chain.
    let rejected = bus
        .execute("acc", BankCommand::Withdraw { amount: 5 })
        .await
        .expect_err("insufficient funds");
    assert!(matches!(rejected, CommandError::Rejected(_)));
    let chain = error_chain(&rejected);
    assert_eq!(chain.matches("insufficient funds").count(), 1, "{chain}");
    let with_anyhow = format!("{:#}", anyhow::Error::from(rejected));
    assert_eq!(
        with_anyhow.matches("insufficient funds").count(),
        1,
        "{with_anyhow}"
    );

    // A database error: the driver's message appears once.
    let error = sqlx::query("SELECT * FROM no_such_table")
        .execute(store.pool())
        .await
        .expect_err("no table");
    let wrapped = StoreError::database("reading", outflow::ErrorKind::Infrastructure, error);
    let chain = error_chain(&wrapped);
    assert_eq!(chain.matches("no_such_table").count(), 1, "{chain}");
}
