//! Failing projection handlers on PostgreSQL: a poison event is retried,
//! found by splitting its batch, parked with its error and skipped, and can be
//! retried or discarded later; `OnError::Stop` stops only that projection,
//! visibly, until it is restarted, and it then resumes at the failing event;
//! failures of the infrastructure are retried without limit and never park.

use outflow_tests as common;

use outflow::EventLog;
use outflow::{ErrorKind, Transactional};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::projection::{HandlerError, OnError, Projection, ProjectionOptions, RetryPolicy};
use outflow::runner::{ProjectionRunner, RetryError, WaitError};
use outflow::store::projections::ProjectionState;
use outflow::{Checkpoint, CommandBus, LogFilter, PostgresStore, RecordedEvent};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// The deposit amount the broken ledger refuses.
const POISON: i64 = 666;

const FAST_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    initial_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(50),
};

const WAIT: Duration = Duration::from_secs(60);

/// The ledger's refusal: an error with a cause, so its chain has two links.
#[derive(Debug)]
struct Refused {
    amount: i64,
    source: std::io::Error,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ledger refused the deposit of {}", self.amount)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

const REFUSAL: &str = "ledger refused the deposit of 666: ledger is broken";

/// Writes one row per event into its own table, in the runner's transaction;
/// refuses deposits of [`POISON`] while `broken` is set. Counts the calls per
/// event.
struct Ledger {
    name: String,
    table: String,
    broken: Arc<AtomicBool>,
    calls: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Ledger {
    fn new(name: &str, table: &str) -> Ledger {
        Ledger {
            name: name.to_owned(),
            table: table.to_owned(),
            broken: Arc::new(AtomicBool::new(true)),
            calls: Arc::default(),
        }
    }
}

fn calls_of(calls: &Mutex<HashMap<Uuid, usize>>, event_id: Uuid) -> usize {
    calls
        .lock()
        .expect("calls lock")
        .get(&event_id)
        .copied()
        .unwrap_or(0)
}

fn amount_of(event: &BankEvent) -> i64 {
    event.balance_change()
}

async fn insert_row(
    table: &str,
    event: &RecordedEvent,
    amount: i64,
    tx: &mut Transaction<'static, Postgres>,
) -> Result<(), HandlerError> {
    sqlx::query(&format!(
        "INSERT INTO {table} (event_id, aggregate_id, sequence, position, amount) \
         VALUES ($1, $2, $3, $4, $5)"
    ))
    .bind(event.event_id)
    .bind(&event.aggregate_id)
    .bind(i64::try_from(event.sequence)?)
    .bind(i64::try_from(event.position)?)
    .bind(amount)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Projection<PostgresStore> for Ledger {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            *self
                .calls
                .lock()
                .map_err(|_| HandlerError::msg("calls lock poisoned"))?
                .entry(event.event_id)
                .or_default() += 1;
            let envelope = event.clone().decode::<BankAccount>(&[])?;
            let amount = amount_of(&envelope.payload);
            if amount == POISON && self.broken.load(Ordering::SeqCst) {
                return Err(Refused {
                    amount,
                    source: std::io::Error::other("ledger is broken"),
                }
                .into());
            }
            insert_row(&self.table, event, amount, tx).await?;
        }
        Ok(())
    }
}

/// No unique key on purpose: an event applied twice shows up twice.
async fn create_ledger_table(pool: &PgPool, table: &str) {
    sqlx::query(&format!(
        "CREATE TABLE {table} (event_id uuid NOT NULL, aggregate_id text NOT NULL, \
         sequence bigint NOT NULL, position bigint NOT NULL, amount bigint NOT NULL)"
    ))
    .execute(pool)
    .await
    .expect("create the ledger table");
}

/// The event ids in a ledger table, in log order, duplicates included.
async fn ledger_ids(pool: &PgPool, table: &str) -> Vec<Uuid> {
    sqlx::query_scalar(&format!(
        "SELECT event_id FROM {table} ORDER BY position, event_id"
    ))
    .fetch_all(pool)
    .await
    .expect("read the ledger table")
}

/// What a command wrote, as the test remembers it.
#[derive(Debug, Clone)]
struct Written {
    event_id: Uuid,
    checkpoint: Checkpoint,
    aggregate_id: String,
    sequence: u64,
    position: u64,
    amount: i64,
}

impl Written {
    fn is_poison(&self) -> bool {
        self.amount == POISON
    }
}

async fn execute(
    bus: &CommandBus<BankAccount, PostgresStore>,
    written: &mut Vec<Written>,
    id: &str,
    command: BankCommand,
) {
    let committed = bus.execute(id, command).await.expect("the command runs");
    for event in &committed.events {
        written.push(Written {
            event_id: event.event_id,
            checkpoint: event.checkpoint(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            position: event.position,
            amount: amount_of(&event.payload),
        });
    }
}

/// The checkpoint of the last event written: a target for `wait_for`. (The
/// store's head can stay behind it while any transaction on the server is
/// open.)
fn last(written: &[Written]) -> Checkpoint {
    written.last().expect("events were written").checkpoint
}

fn ids(written: &[Written]) -> Vec<Uuid> {
    written.iter().map(|w| w.event_id).collect()
}

fn runner_builder(
    store: &PostgresStore,
) -> outflow::runner::ProjectionRunnerBuilder<PostgresStore> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_retried_parked_and_skipped_then_retried_or_discarded() {
    let db = common::TestDb::new("poison_park").await;
    let store = db.store().await;
    create_ledger_table(store.pool(), "ledger").await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());

    // Three poison deposits among healthy events, all in the log before the
    // runner starts: the first batch holds them all.
    let mut written = Vec::new();
    for (id, command) in [
        ("acc-a", BankCommand::Open { owner: "A".into() }),
        ("acc-b", BankCommand::Open { owner: "B".into() }),
        ("acc-a", BankCommand::Deposit { amount: 10 }),
        ("acc-b", BankCommand::Deposit { amount: 20 }),
        ("acc-a", BankCommand::Deposit { amount: POISON }),
        ("acc-a", BankCommand::Deposit { amount: 11 }),
        ("acc-b", BankCommand::Deposit { amount: POISON }),
        ("acc-b", BankCommand::Deposit { amount: 21 }),
        ("acc-a", BankCommand::Withdraw { amount: 5 }),
        ("acc-a", BankCommand::Deposit { amount: POISON }),
        ("acc-a", BankCommand::Deposit { amount: 12 }),
        ("acc-b", BankCommand::Deposit { amount: 22 }),
    ] {
        execute(&bus, &mut written, id, command).await;
    }
    let poison: Vec<Written> = written.iter().filter(|w| w.is_poison()).cloned().collect();
    let healthy: Vec<Written> = written.iter().filter(|w| !w.is_poison()).cloned().collect();
    assert_eq!(poison.len(), 3);
    let head = last(&written);

    let ledger = Ledger::new("ledger", "ledger");
    let broken = ledger.broken.clone();
    let calls = ledger.calls.clone();
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(ledger)
                .batch_size(100)
                .retry(FAST_RETRY)
                .on_error(OnError::Park),
        )
        .build()
        .expect("runner");
    // A wait begun before the runner starts sees every poison event parked
    // on the way, and reports the first...
    let waiting = tokio::spawn({
        let runner = runner.clone();
        async move { runner.wait_for(head, &["ledger"], WAIT).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["ledger"]).await;
    match waiting.await.expect("the wait") {
        Err(WaitError::Parked {
            projection, event, ..
        }) => {
            assert_eq!(projection, "ledger");
            assert!(
                poison.iter().any(|p| Some(p.position) == event.position),
                "{event:?} is not a poison event"
            );
        }
        other => panic!("expected a parked event, got {other:?}"),
    }
    // ...and one begun once the projection is past them succeeds.
    runner
        .wait_for(head, &["ledger"], WAIT)
        .await
        .expect("the projection gets past the poison events");

    // The events after each poison one are applied, the poison ones are not.
    assert_eq!(ledger_ids(store.pool(), "ledger").await, ids(&healthy));

    // Each poison event is parked with its error chain, attempts and reference.
    let parked = runner.dead_letters("ledger").await.expect("dead letters");
    assert_eq!(parked.len(), 3, "{parked:#?}");
    for (dead, event) in parked.iter().zip(&poison) {
        assert_eq!(dead.unit.projection, "ledger");
        assert_eq!(dead.event_id, event.event_id);
        assert_eq!(dead.checkpoint, event.checkpoint);
        assert_eq!(dead.event.aggregate_type, "account");
        assert_eq!(dead.event.aggregate_id, event.aggregate_id);
        assert_eq!(dead.event.sequence, event.sequence);
        assert_eq!(dead.event.position, Some(event.position));
        assert_eq!(dead.event.event_type, "Deposited");
        assert_eq!(dead.event.event_version, "1.0");
        assert_eq!(dead.error, REFUSAL);
        assert!(dead.attempts >= 3, "{dead:?}");
        assert!(dead.first_failed_at <= dead.last_failed_at, "{dead:?}");
        assert!(
            calls_of(&calls, event.event_id) >= 3,
            "the handler saw {} only {} times",
            event.event_id,
            calls_of(&calls, event.event_id)
        );
    }
    let status = common::status_of(&runner, "ledger").await;
    assert_eq!(status.parked, 3, "{status:?}");
    assert!(status.checkpoint >= head, "{status:?}");
    assert_eq!(status.lag_events, 0, "{status:?}");

    // Retrying while the handler is still broken fails and counts the attempt.
    let first = parked[0].clone();
    match runner.retry_dead_letter("ledger", first.id).await {
        Err(RetryError::Handler(error)) => assert_eq!(error.chain(), REFUSAL),
        other => panic!("expected RetryError::Handler, got {other:?}"),
    }
    let after = runner.dead_letters("ledger").await.expect("dead letters");
    assert_eq!(after.len(), 3);
    assert_eq!(after[0].id, first.id);
    assert_eq!(after[0].attempts, first.attempts + 1);
    assert_eq!(after[0].error, REFUSAL);
    assert!(after[0].last_failed_at >= first.last_failed_at);
    assert_eq!(ledger_ids(store.pool(), "ledger").await, ids(&healthy));

    // An unknown id is refused.
    let unknown = parked.iter().map(|d| d.id).max().expect("ids") + 1000;
    match runner.retry_dead_letter("ledger", unknown).await {
        Err(RetryError::NotFound { projection, id }) => {
            assert_eq!((projection.as_str(), id), ("ledger", unknown));
        }
        other => panic!("expected RetryError::NotFound, got {other:?}"),
    }

    // Discarding drops one dead letter without applying it.
    assert!(runner
        .discard_dead_letter(parked[1].id)
        .await
        .expect("discard"));
    assert!(!runner
        .discard_dead_letter(parked[1].id)
        .await
        .expect("discard again"));
    let after: Vec<u64> = runner
        .dead_letters("ledger")
        .await
        .expect("dead letters")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(after, vec![parked[0].id, parked[2].id]);
    assert_eq!(common::status_of(&runner, "ledger").await.parked, 2);

    // After the fix, a retry applies the event and removes its dead letter.
    broken.store(false, Ordering::SeqCst);
    runner
        .retry_dead_letter("ledger", parked[0].id)
        .await
        .expect("the retry succeeds after the fix");
    let after: Vec<u64> = runner
        .dead_letters("ledger")
        .await
        .expect("dead letters")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(after, vec![parked[2].id]);
    let (succeeded, failed) = runner
        .retry_dead_letters("ledger")
        .await
        .expect("retry all");
    assert_eq!(succeeded, 1);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(runner
        .dead_letters("ledger")
        .await
        .expect("dead letters")
        .is_empty());
    assert_eq!(common::status_of(&runner, "ledger").await.parked, 0);

    // Every event but the discarded one is in the read model, exactly once.
    let expected: Vec<Uuid> = written
        .iter()
        .filter(|w| w.event_id != poison[1].event_id)
        .map(|w| w.event_id)
        .collect();
    assert_eq!(ledger_ids(store.pool(), "ledger").await, expected);

    // New events still flow after all this.
    let mut more = Vec::new();
    execute(
        &bus,
        &mut more,
        "acc-b",
        BankCommand::Deposit { amount: 23 },
    )
    .await;
    runner
        .wait_for(more[0].checkpoint, &["ledger"], WAIT)
        .await
        .expect("live again");
    let rows = ledger_ids(store.pool(), "ledger").await;
    assert_eq!(rows.last(), Some(&more[0].event_id));
    assert_eq!(rows.len(), expected.len() + 1);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_error_stop_halts_only_that_projection_until_restarted() {
    let db = common::TestDb::new("poison_stop").await;
    let store = db.store().await;
    create_ledger_table(store.pool(), "ledger_stop").await;
    create_ledger_table(store.pool(), "ledger_live").await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());

    let mut written = Vec::new();
    for (id, command) in [
        ("acc-a", BankCommand::Open { owner: "A".into() }),
        ("acc-a", BankCommand::Deposit { amount: 1 }),
        ("acc-b", BankCommand::Open { owner: "B".into() }),
        ("acc-a", BankCommand::Deposit { amount: 2 }),
        ("acc-b", BankCommand::Deposit { amount: POISON }),
        ("acc-a", BankCommand::Deposit { amount: 3 }),
        ("acc-b", BankCommand::Deposit { amount: 4 }),
    ] {
        execute(&bus, &mut written, id, command).await;
    }
    let poison_at = written
        .iter()
        .position(Written::is_poison)
        .expect("a poison event");
    let poison = written[poison_at].clone();

    let stopping = Ledger::new("ledger_stop", "ledger_stop");
    let broken = stopping.broken.clone();
    let calls = stopping.calls.clone();
    let healthy = Ledger::new("ledger_live", "ledger_live");
    healthy.broken.store(false, Ordering::SeqCst);
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(stopping)
                .batch_size(100)
                .retry(FAST_RETRY)
                .on_error(OnError::Stop),
        )
        .projection(
            ProjectionOptions::new(healthy)
                .batch_size(100)
                .retry(FAST_RETRY)
                .on_error(OnError::Stop),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);

    // The projection stops at the poison event, with that event in its error.
    let status = common::wait_for_status(&runner, "ledger_stop", |s| {
        s.state == ProjectionState::Stopped
    })
    .await;
    let error = status
        .last_error
        .clone()
        .expect("a stopped unit has an error");
    let event_ref = store
        .read_log(written[poison_at - 1].checkpoint, &LogFilter::all(), 1)
        .await
        .expect("read the poison event")
        .first()
        .expect("the poison event")
        .event_ref();
    assert_eq!(event_ref.position, Some(poison.position));
    assert!(
        error.contains(&event_ref.to_string()) && error.contains(REFUSAL),
        "{error}"
    );
    assert_eq!(
        status.checkpoint,
        written[poison_at - 1].checkpoint,
        "stopped right before the poison event"
    );
    assert!(calls_of(&calls, poison.event_id) >= 3);
    assert_eq!(
        ledger_ids(store.pool(), "ledger_stop").await,
        ids(&written[..poison_at])
    );
    assert!(runner
        .dead_letters("ledger_stop")
        .await
        .expect("dead letters")
        .is_empty());

    // wait_for reports the stop instead of running into its timeout.
    let head = last(&written);
    match runner.wait_for(head, &["ledger_stop"], WAIT).await {
        Err(WaitError::Stopped { projection, error }) => {
            assert_eq!(projection, "ledger_stop");
            assert!(error.contains(REFUSAL), "{error}");
        }
        other => panic!("expected WaitError::Stopped, got {other:?}"),
    }

    // The other projection of the same runner goes on, live.
    runner
        .wait_for(head, &["ledger_live"], WAIT)
        .await
        .expect("the healthy projection catches up");
    execute(
        &bus,
        &mut written,
        "acc-a",
        BankCommand::Deposit { amount: 5 },
    )
    .await;
    execute(
        &bus,
        &mut written,
        "acc-b",
        BankCommand::Withdraw { amount: 4 },
    )
    .await;
    let head = last(&written);
    runner
        .wait_for(head, &["ledger_live"], WAIT)
        .await
        .expect("the healthy projection follows new events");
    assert_eq!(ledger_ids(store.pool(), "ledger_live").await, ids(&written));
    let status = common::status_of(&runner, "ledger_stop").await;
    assert_eq!(status.state, ProjectionState::Stopped);
    assert_eq!(status.checkpoint, written[poison_at - 1].checkpoint);
    assert_eq!(
        ledger_ids(store.pool(), "ledger_stop").await,
        ids(&written[..poison_at])
    );
    match runner
        .wait_for(head, &["ledger_live", "ledger_stop"], WAIT)
        .await
    {
        Err(WaitError::Stopped { projection, .. }) => assert_eq!(projection, "ledger_stop"),
        other => panic!("expected WaitError::Stopped, got {other:?}"),
    }

    // After the fix and a restart it resumes at the poison event: every event
    // exactly once, in log order.
    broken.store(false, Ordering::SeqCst);
    runner.restart("ledger_stop").await.expect("restart");
    runner
        .wait_for(head, &["ledger_stop"], WAIT)
        .await
        .expect("the restarted projection catches up");
    assert_eq!(ledger_ids(store.pool(), "ledger_stop").await, ids(&written));
    let status =
        common::wait_for_status(&runner, "ledger_stop", |s| s.state == ProjectionState::Live).await;
    assert_eq!(status.last_error, None);
    assert_eq!(status.parked, 0);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

/// How [`Flaky`] fails.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// `sqlx::Error::PoolTimedOut`, converted by `?`.
    Sqlx,
    /// `StoreError::Database` around `PoolTimedOut`.
    Store,
    /// An application error whose cause is `PoolTimedOut`.
    Wrapped,
    /// A plain message: not the infrastructure's fault.
    Plain,
}

#[derive(Debug)]
struct Wrapped(sqlx::Error);

impl fmt::Display for Wrapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("could not reach the read model")
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn failure(kind: Failure) -> HandlerError {
    match kind {
        Failure::Sqlx => sqlx::Error::PoolTimedOut.into(),
        Failure::Store => outflow::StoreError::Database {
            operation: "writing the read model",
            kind: outflow::ErrorKind::Transient,
            source: Box::new(sqlx::Error::PoolTimedOut),
        }
        .into(),
        Failure::Wrapped => Wrapped(sqlx::Error::PoolTimedOut).into(),
        Failure::Plain => HandlerError::msg("the read model said no"),
    }
}

/// Fails its first `failures` calls, then writes one row per event.
struct Flaky {
    name: String,
    kind: Failure,
    failures: AtomicUsize,
    calls: Arc<AtomicUsize>,
}

#[async_trait]
impl Projection<PostgresStore> for Flaky {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(failure(self.kind));
        }
        for event in events {
            insert_row(&self.name, event, 0, tx).await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_are_retried_without_limit_and_never_park() {
    let db = common::TestDb::new("transient").await;
    let store = db.store().await;
    // The classification the runner relies on: the backend classifies its
    // driver's errors, wherever they sit in the chain.
    let classify = |e: &(dyn std::error::Error + 'static)| store.classify(e);
    for kind in [Failure::Sqlx, Failure::Store, Failure::Wrapped] {
        assert_eq!(
            failure(kind).kind_with(classify),
            ErrorKind::Transient,
            "{kind:?}"
        );
    }
    assert_eq!(failure(Failure::Plain).kind_with(classify), ErrorKind::Data);
    assert_eq!(
        HandlerError::from(sqlx::Error::RowNotFound).kind_with(classify),
        ErrorKind::Data
    );
    let missing_table = sqlx::query("SELECT * FROM no_such_table")
        .execute(store.pool())
        .await
        .expect_err("no such table");
    assert_eq!(
        HandlerError::from(missing_table).kind_with(classify),
        ErrorKind::Infrastructure
    );
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let mut written = Vec::new();
    for i in 0..5 {
        let id = format!("acc-{i}");
        execute(
            &bus,
            &mut written,
            &id,
            BankCommand::Open {
                owner: format!("owner {i}"),
            },
        )
        .await;
        execute(&bus, &mut written, &id, BankCommand::Deposit { amount: 7 }).await;
    }
    let head = last(&written);

    // Each fails its first 8 calls; 3 attempts are allowed before parking.
    const FAILURES: usize = 8;
    let mut builder = runner_builder(&store);
    let mut calls = Vec::new();
    for (name, kind) in [
        ("flaky_sqlx", Failure::Sqlx),
        ("flaky_store", Failure::Store),
        ("flaky_wrapped", Failure::Wrapped),
        ("flaky_plain", Failure::Plain),
    ] {
        create_ledger_table(store.pool(), name).await;
        let counter = Arc::new(AtomicUsize::new(0));
        calls.push((name, counter.clone()));
        builder = builder.projection(
            ProjectionOptions::new(Flaky {
                name: name.to_owned(),
                kind,
                failures: AtomicUsize::new(FAILURES),
                calls: counter,
            })
            .batch_size(100)
            .retry(FAST_RETRY)
            .on_error(OnError::Park),
        );
    }
    let runner = builder.build().expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(
        &runner,
        &["flaky_sqlx", "flaky_store", "flaky_wrapped", "flaky_plain"],
    )
    .await;
    // Only the plain handler's errors are the data's fault: its events are
    // parked, and a wait that sees that happen says so (one begun after it
    // happened does not: the parked events are older than the wait).
    match runner
        .wait_for(
            head,
            &["flaky_sqlx", "flaky_store", "flaky_wrapped", "flaky_plain"],
            WAIT,
        )
        .await
    {
        Err(WaitError::Parked { projection, .. }) => assert_eq!(projection, "flaky_plain"),
        Ok(()) => {}
        Err(other) => panic!("expected flaky_plain's parked events, got {other:?}"),
    }
    runner
        .wait_for(
            head,
            &["flaky_sqlx", "flaky_store", "flaky_wrapped", "flaky_plain"],
            WAIT,
        )
        .await
        .expect("every projection gets through");

    for (name, counter) in &calls[..3] {
        assert_eq!(
            ledger_ids(store.pool(), name).await,
            ids(&written),
            "{name}: every event applied once"
        );
        assert!(
            runner
                .dead_letters(name)
                .await
                .expect("dead letters")
                .is_empty(),
            "{name} parked an event on a transient failure"
        );
        assert!(
            counter.load(Ordering::SeqCst) > FAILURES,
            "{name}: retried past max_attempts until it succeeded"
        );
        let status = common::status_of(&runner, name).await;
        assert_eq!(status.parked, 0, "{status:?}");
    }

    // The same failures, not transient, park: 3 attempts on the batch, 3 on
    // its first event alone, and that event is given up on.
    let parked = runner
        .dead_letters("flaky_plain")
        .await
        .expect("dead letters");
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert_eq!(parked[0].event_id, written[0].event_id);
    assert_eq!(parked[0].error, "the read model said no");
    assert_eq!(
        ledger_ids(store.pool(), "flaky_plain").await,
        ids(&written[1..])
    );

    shutdown.cancel();
    handle.await.expect("the runner stops");
}
