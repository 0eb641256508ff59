//! Operating projections: a rebuild reports its progress (receiver and
//! status) and ends with the same read model; pause holds a projection and
//! resume lets it go on; a killed `LISTEN` connection neither stops the runner
//! nor stays dead; an inbox makes an outside effect happen once per event
//! across redelivery (and shows it is at least once); and the in-memory
//! backend runs projections like PostgreSQL does.

use outflow_tests as common;

use outflow::store::{Checkpoints, Inbox};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use example_accounts::projections::{BalanceRow, Balances};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::doc_fixture::{Counter, CounterCommand, CounterEvent};
use outflow::projection::{
    typed, EventHandler, HandlerError, OnError, Projection, ProjectionOptions, RetryPolicy,
};
use outflow::runner::{ProjectionRunner, RebuildProgress, WaitError};
use outflow::store::memory::MemoryTransaction;
use outflow::store::projections::ProjectionState;
use outflow::{
    AppendRequest, Checkpoint, CommandBus, Envelope, EventStore, LogFilter, MemoryStore, NewEvent,
    PostgresStore, RecordedEvent,
};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

const FAST_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    initial_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(50),
};

fn runner_builder<S: outflow::Backend>(store: &S) -> outflow::runner::ProjectionRunnerBuilder<S> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
}

/// Waits until the store's head (what log readers may read up to) has
/// passed `target`: an open transaction anywhere on the server holds it back
/// for a moment.
async fn head_reaches<S: outflow::EventLog>(store: &S, target: Checkpoint) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.head().await.expect("head") < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the head never reached {target}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn balance_of(pool: &PgPool, account: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT balance FROM account_balances WHERE account_id = $1")
        .bind(account)
        .fetch_optional(pool)
        .await
        .expect("read a balance")
}

// ---------------------------------------------------------------------------
// a. Rebuild with progress

/// `Balances`, with a gate: each batch takes one permit, and waits while
/// there is none. Lets the test hold a rebuild half-way.
struct Gated {
    inner: Balances,
    permits: Arc<AtomicI64>,
    waiting: Arc<AtomicBool>,
}

#[async_trait]
impl Projection<PostgresStore> for Gated {
    fn name(&self) -> &str {
        Projection::<PostgresStore>::name(&self.inner)
    }

    fn filter(&self) -> LogFilter {
        self.inner.filter()
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        while self
            .permits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n > 0).then_some(n - 1)
            })
            .is_err()
        {
            self.waiting.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.waiting.store(false, Ordering::SeqCst);
        self.inner.handle(events, tx).await
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        self.inner.reset(tx).await
    }
}

const ACCOUNTS: usize = 20;
const ROUNDS: usize = 3;
const PER_APPEND: usize = 50;
const ACCOUNT_EVENTS: usize = ACCOUNTS * ROUNDS * PER_APPEND;

fn events_for(account: usize, round: usize) -> Vec<BankEvent> {
    (0..PER_APPEND)
        .map(|i| {
            if round == 0 && i == 0 {
                BankEvent::AccountOpened {
                    owner: format!("owner-{account}"),
                }
            } else if matches!((i + account) % 5, 0) {
                BankEvent::Withdrawn { amount: 2 }
            } else {
                BankEvent::Deposited {
                    amount: (i % 11 + 1) as i64,
                }
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_reports_progress_and_ends_with_the_same_read_model() {
    let db = common::TestDb::new("admin_rebuild").await;
    let store = db.store().await;
    Balances::create_table(store.pool()).await.expect("table");

    // 3000 account events, and counter events the projection does not want.
    let mut expected: BTreeMap<String, BalanceRow> = BTreeMap::new();
    let mut target = Checkpoint::START;
    for round in 0..ROUNDS {
        for account in 0..ACCOUNTS {
            let id = format!("acc-{account:02}");
            let events = events_for(account, round);
            Balances::fold(&events, &id, expected.entry(id.clone()).or_default());
            let written = store
                .append(AppendRequest {
                    aggregate_type: "account".into(),
                    aggregate_id: id.clone(),
                    expected_version: (round * PER_APPEND) as u64,
                    events: events
                        .iter()
                        .map(|e| NewEvent::from_event::<BankAccount>(&id, e).expect("serialize"))
                        .collect(),
                })
                .await
                .expect("append");
            target = written.last().expect("written").checkpoint();
        }
        store
            .append(AppendRequest {
                aggregate_type: "counter".into(),
                aggregate_id: "c-1".into(),
                expected_version: (round * 10) as u64,
                events: (0..10)
                    .map(|_| {
                        NewEvent::from_event::<Counter>("c-1", &CounterEvent::Incremented { by: 1 })
                            .expect("serialize")
                    })
                    .collect(),
            })
            .await
            .expect("append counter events");
    }
    let expected: Vec<BalanceRow> = expected.into_values().collect();

    let permits = Arc::new(AtomicI64::new(i64::MAX));
    let waiting = Arc::new(AtomicBool::new(false));
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(Gated {
                inner: Balances::new(),
                permits: permits.clone(),
                waiting: waiting.clone(),
            })
            .batch_size(250),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_balances"]).await;
    runner
        .wait_for(target, &["account_balances"], WAIT)
        .await
        .expect("caught up");
    assert_eq!(Balances::rows(store.pool()).await.expect("rows"), expected);

    // Spoil the read model: the rebuild's reset must wipe it.
    sqlx::query("UPDATE account_balances SET balance = balance + 1000, events = 0")
        .execute(store.pool())
        .await
        .expect("spoil the table");
    assert_ne!(Balances::rows(store.pool()).await.expect("rows"), expected);

    // Hold the replay after three batches.
    head_reaches(&store, target).await;
    permits.store(3, Ordering::SeqCst);
    let mut progress = runner.rebuild("account_balances").await.expect("rebuild");
    assert_eq!(
        *progress.borrow(),
        RebuildProgress {
            done: 0,
            total: ACCOUNT_EVENTS as u64
        },
        "the total counts the account events only"
    );
    // Once the gate holds the fourth batch, nothing more can commit: only
    // then is a status read comparable with the table.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !waiting.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay never reached the gate"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held = common::wait_for_status(&runner, "account_balances", |s| {
        s.rebuild.is_some_and(|p| p.done > 0)
    })
    .await;
    let mid = held.rebuild.expect("progress while rebuilding");
    assert!(mid.done > 0 && mid.done < mid.total, "{mid:?}");
    assert_eq!(mid.total, ACCOUNT_EVENTS as u64);
    assert_eq!(held.processed, mid.done);
    assert!(held.lag_events > 0, "{held:?}");
    // The read model holds exactly the events counted as done.
    let applied: i64 = Balances::rows(store.pool())
        .await
        .expect("rows")
        .iter()
        .map(|r| r.events)
        .sum();
    assert_eq!(u64::try_from(applied).expect("positive"), mid.done);
    // The receiver reports the same progress.
    let deadline = tokio::time::Instant::now() + WAIT;
    while *progress.borrow() != mid {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the receiver shows {:?}, the status {mid:?}",
            *progress.borrow()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Let it finish; the receiver goes up to done == total, then closes.
    permits.store(i64::MAX, Ordering::SeqCst);
    let mut seen = vec![*progress.borrow_and_update()];
    tokio::time::timeout(WAIT, async {
        while progress.changed().await.is_ok() {
            seen.push(*progress.borrow_and_update());
        }
    })
    .await
    .expect("the rebuild finishes");
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done), "{seen:?}");
    assert!(seen.iter().all(|p| p.total == ACCOUNT_EVENTS as u64));
    assert_eq!(
        seen.last().copied(),
        Some(RebuildProgress {
            done: ACCOUNT_EVENTS as u64,
            total: ACCOUNT_EVENTS as u64
        })
    );
    runner
        .wait_for(target, &["account_balances"], WAIT)
        .await
        .expect("rebuilt");
    assert_eq!(Balances::rows(store.pool()).await.expect("rows"), expected);
    let status = common::wait_for_status(&runner, "account_balances", |s| {
        s.state == ProjectionState::Live
    })
    .await;
    assert_eq!(status.rebuild, None, "{status:?}");
    assert_eq!(status.processed, ACCOUNT_EVENTS as u64);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

// ---------------------------------------------------------------------------
// b. Pause and resume

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_projection_applies_nothing_until_resumed() {
    let db = common::TestDb::new("admin_pause").await;
    let store = db.store().await;
    Balances::create_table(store.pool()).await.expect("table");
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    bus.execute(
        "acc-1",
        BankCommand::Open {
            owner: "Ann".into(),
        },
    )
    .await
    .expect("open");
    let deposit = bus
        .execute("acc-1", BankCommand::Deposit { amount: 10 })
        .await
        .expect("deposit");

    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Balances::new()))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_balances"]).await;
    runner
        .wait_for(
            deposit.checkpoint().expect("written"),
            &["account_balances"],
            WAIT,
        )
        .await
        .expect("caught up");
    assert_eq!(balance_of(store.pool(), "acc-1").await, Some(10));

    runner.pause("account_balances").await.expect("pause");
    // The pause reaches the worker within a heartbeat; it then records it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let units = store.units(Some("account_balances")).await.expect("units");
        if units.iter().all(|u| u.state == ProjectionState::Paused) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never paused: {units:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let held = bus
        .execute("acc-1", BankCommand::Deposit { amount: 5 })
        .await
        .expect("deposit while paused");
    let held_at = held.checkpoint().expect("written");
    // Over a second, nothing of it is applied.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(balance_of(store.pool(), "acc-1").await, Some(10));
        let status = runner.status().await.expect("status");
        assert_eq!(status[0].state, ProjectionState::Paused, "{status:?}");
        assert!(status[0].paused);
        assert!(status[0].checkpoint < held_at, "{status:?}");
    }
    head_reaches(&store, held_at).await;
    let status = runner.status().await.expect("status");
    assert_eq!(status[0].lag_events, 1, "{status:?}");
    match runner
        .wait_for(held_at, &["account_balances"], Duration::from_millis(200))
        .await
    {
        Err(WaitError::Timeout { projection, .. }) => assert_eq!(projection, "account_balances"),
        other => panic!("expected a timeout while paused, got {other:?}"),
    }

    runner.resume("account_balances").await.expect("resume");
    runner
        .wait_for(held_at, &["account_balances"], WAIT)
        .await
        .expect("resumed");
    assert_eq!(balance_of(store.pool(), "acc-1").await, Some(15));
    let status = common::wait_for_status(&runner, "account_balances", |s| {
        s.state == ProjectionState::Live
    })
    .await;
    assert!(!status.paused);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

// ---------------------------------------------------------------------------
// c. A killed LISTEN connection

async fn listen_pids(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
          WHERE datname = current_database() AND query LIKE 'LISTEN%' ORDER BY pid",
    )
    .fetch_all(pool)
    .await
    .expect("read pg_stat_activity")
}

/// Polls until a `LISTEN` connection other than `old` exists.
async fn new_listener(pool: &PgPool, old: &[i32], within: Duration) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let pids = listen_pids(pool).await;
        if pids.iter().any(|pid| !old.contains(pid)) {
            return pids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new LISTEN connection within {within:?} (had {old:?}, now {pids:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_listen_connection_is_replaced_and_polling_covers_the_gap() {
    let db = common::TestDb::new("admin_listen").await;
    let store = PostgresStore::builder(db.pool(20).await)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("store");
    Balances::create_table(store.pool()).await.expect("table");
    // Commands come from another store that sends no NOTIFY: the runner's
    // store only learns of them by notification from nobody, or by polling.
    let writer = PostgresStore::builder(db.pool(5).await)
        .notify_other_nodes(false)
        .build()
        .await
        .expect("writer store");
    let bus = CommandBus::<BankAccount, _>::new(writer, ());

    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Balances::new()))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_balances"]).await;
    let opened = bus
        .execute(
            "acc-1",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await
        .expect("open");
    runner
        .wait_for(
            opened.checkpoint().expect("written"),
            &["account_balances"],
            WAIT,
        )
        .await
        .expect("caught up");

    // The runner's store listens; kill that connection from the server side.
    let admin = db.pool(2).await;
    let before = new_listener(&admin, &[], WAIT).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
          WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&admin)
    .await
    .expect("terminate the LISTEN connection");
    assert!(
        !killed.is_empty() && killed.iter().all(|k| *k),
        "{killed:?}"
    );

    // New events are still projected.
    let mut last = None;
    for amount in [10, 20, 30] {
        last = bus
            .execute("acc-1", BankCommand::Deposit { amount })
            .await
            .expect("deposit")
            .checkpoint();
    }
    runner
        .wait_for(last.expect("written"), &["account_balances"], WAIT)
        .await
        .expect("the runner keeps catching up");
    assert_eq!(balance_of(store.pool(), "acc-1").await, Some(60));

    // And the store listens again, on a new connection.
    let after = new_listener(&admin, &before, Duration::from_secs(10)).await;
    assert!(after.iter().all(|pid| !before.contains(pid)), "{after:?}");

    // Still live afterwards.
    let last = bus
        .execute("acc-1", BankCommand::Withdraw { amount: 1 })
        .await
        .expect("withdraw")
        .checkpoint()
        .expect("written");
    runner
        .wait_for(last, &["account_balances"], WAIT)
        .await
        .expect("live after re-listening");
    assert_eq!(balance_of(store.pool(), "acc-1").await, Some(59));

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

// ---------------------------------------------------------------------------
// d. Outside effects with the inbox

/// "Sends an e-mail" per account event (appends its id to a list outside
/// the database), guarded by the inbox. Fails once, after sending, on
/// `fail_after_send`.
struct Mailer {
    store: PostgresStore,
    outbox: Arc<Mutex<Vec<Uuid>>>,
    deliveries: Arc<AtomicUsize>,
    fail_after_send: Arc<Mutex<Option<Uuid>>>,
}

#[async_trait]
impl Projection<PostgresStore> for Mailer {
    fn name(&self) -> &str {
        "mailer"
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
            self.deliveries.fetch_add(1, Ordering::SeqCst);
            if !self
                .store
                .inbox_claim(tx, "mailer", &event.event_id.to_string())
                .await?
            {
                continue;
            }
            self.outbox
                .lock()
                .map_err(|_| HandlerError::msg("outbox lock poisoned"))?
                .push(event.event_id);
            let mut fail = self
                .fail_after_send
                .lock()
                .map_err(|_| HandlerError::msg("lock poisoned"))?;
            if *fail == Some(event.event_id) {
                *fail = None;
                return Err(HandlerError::msg(
                    "the commit fails after the e-mail went out",
                ));
            }
        }
        Ok(())
    }
}

fn sent_counts(outbox: &Mutex<Vec<Uuid>>) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::new();
    for id in outbox.lock().expect("outbox lock").iter() {
        *counts.entry(*id).or_default() += 1;
    }
    counts
}

async fn inbox_ids(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT message_id FROM events_inbox WHERE handler = 'mailer' ORDER BY message_id",
    )
    .fetch_all(pool)
    .await
    .expect("read the inbox")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_inbox_makes_an_outside_effect_happen_once_per_event() {
    let db = common::TestDb::new("admin_inbox").await;
    let store = db.store().await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let mut written: Vec<(Uuid, Checkpoint)> = Vec::new();
    for i in 0..3 {
        let id = format!("acc-{i}");
        for command in [
            BankCommand::Open {
                owner: format!("owner {i}"),
            },
            BankCommand::Deposit { amount: 10 },
            BankCommand::Withdraw { amount: 3 },
        ] {
            let committed = bus.execute(&id, command).await.expect("command");
            written.extend(
                committed
                    .events
                    .iter()
                    .map(|e| (e.event_id, e.checkpoint())),
            );
        }
    }
    let target = written.last().expect("written").1;
    let failing = written[4].0;

    let outbox = Arc::new(Mutex::new(Vec::new()));
    let deliveries = Arc::new(AtomicUsize::new(0));
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(Mailer {
                store: store.clone(),
                outbox: outbox.clone(),
                deliveries: deliveries.clone(),
                fail_after_send: Arc::new(Mutex::new(Some(failing))),
            })
            // One event per transaction: a failure repeats only its own e-mail.
            .batch_size(1)
            .retry(FAST_RETRY),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["mailer"]).await;
    runner
        .wait_for(target, &["mailer"], WAIT)
        .await
        .expect("caught up");

    // At least once: the failed commit repeated that one e-mail; the inbox
    // still holds every event once.
    let counts = sent_counts(&outbox);
    assert_eq!(counts.len(), written.len());
    for (id, _) in &written {
        let expected = if *id == failing { 2 } else { 1 };
        assert_eq!(counts.get(id), Some(&expected), "e-mails for {id}");
    }
    let mut all: Vec<String> = written.iter().map(|(id, _)| id.to_string()).collect();
    all.sort();
    assert_eq!(inbox_ids(store.pool()).await, all);
    assert_eq!(deliveries.load(Ordering::SeqCst), written.len() + 1);
    assert!(runner
        .dead_letters("mailer")
        .await
        .expect("dead letters")
        .is_empty());

    // Redelivery of everything (a rebuild whose reset keeps the inbox): the
    // handler sees each event again, and sends nothing.
    head_reaches(&store, target).await;
    let mut progress = runner.rebuild("mailer").await.expect("rebuild");
    tokio::time::timeout(WAIT, async { while progress.changed().await.is_ok() {} })
        .await
        .expect("the rebuild finishes");
    runner
        .wait_for(target, &["mailer"], WAIT)
        .await
        .expect("replayed");
    assert_eq!(
        deliveries.load(Ordering::SeqCst),
        2 * written.len() + 1,
        "every event was handed to the handler again"
    );
    assert_eq!(sent_counts(&outbox), counts, "no e-mail went out twice");
    assert_eq!(inbox_ids(store.pool()).await, all);

    // A new event still gets its one e-mail.
    let committed = bus
        .execute("acc-0", BankCommand::Deposit { amount: 1 })
        .await
        .expect("deposit");
    runner
        .wait_for(committed.checkpoint().expect("written"), &["mailer"], WAIT)
        .await
        .expect("live");
    assert_eq!(
        sent_counts(&outbox).get(&committed.events[0].event_id),
        Some(&1)
    );

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

// ---------------------------------------------------------------------------
// e. The in-memory backend

const POISON: i64 = 666;

/// A typed handler keeping its read model in memory: amounts by log position
/// (an upsert, so a retried batch does not count twice).
#[derive(Default)]
struct MemoryLedger {
    applied: Mutex<BTreeMap<u64, (String, i64)>>,
    calls: Mutex<HashMap<Uuid, usize>>,
    broken: AtomicBool,
}

struct MemoryLedgerHandler(Arc<MemoryLedger>);

#[async_trait]
impl EventHandler<BankAccount, MemoryStore> for MemoryLedgerHandler {
    fn name(&self) -> &str {
        "memory_ledger"
    }

    async fn handle(
        &self,
        event: &Envelope<BankAccount>,
        _tx: &mut MemoryTransaction,
    ) -> Result<(), HandlerError> {
        *self
            .0
            .calls
            .lock()
            .map_err(|_| HandlerError::msg("lock poisoned"))?
            .entry(event.event_id)
            .or_default() += 1;
        let amount = event.payload.balance_change();
        if amount == POISON && self.0.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::msg("memory ledger refuses 666"));
        }
        self.0
            .applied
            .lock()
            .map_err(|_| HandlerError::msg("lock poisoned"))?
            .insert(event.position, (event.aggregate_id.clone(), amount));
        Ok(())
    }
}

impl MemoryLedger {
    fn positions(&self) -> Vec<u64> {
        self.applied.lock().expect("lock").keys().copied().collect()
    }

    fn calls_of(&self, id: Uuid) -> usize {
        self.calls
            .lock()
            .expect("lock")
            .get(&id)
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_memory_store_runs_projections_like_postgres() {
    let store = MemoryStore::new();
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let counters = CommandBus::<Counter, _>::new(store.clone(), ());
    let mut written: Vec<Envelope<BankAccount>> = Vec::new();
    let mut others = Vec::new();
    for (id, command) in [
        ("acc-a", BankCommand::Open { owner: "A".into() }),
        ("acc-b", BankCommand::Open { owner: "B".into() }),
        ("acc-a", BankCommand::Deposit { amount: 10 }),
        ("acc-b", BankCommand::Deposit { amount: POISON }),
        ("acc-a", BankCommand::Deposit { amount: 11 }),
        ("acc-b", BankCommand::Withdraw { amount: 6 }),
        ("acc-a", BankCommand::Deposit { amount: 12 }),
    ] {
        written.extend(bus.execute(id, command).await.expect("command").events);
        others.extend(
            counters
                .execute("c-1", CounterCommand::Increment { by: 1 })
                .await
                .expect("counter")
                .events
                .into_iter()
                .map(|e| e.event_id),
        );
    }
    let poison = written
        .iter()
        .find(|e| e.payload == BankEvent::Deposited { amount: POISON })
        .expect("a poison event")
        .clone();
    let healthy: Vec<u64> = written
        .iter()
        .filter(|e| e.event_id != poison.event_id)
        .map(|e| e.position)
        .collect();

    let ledger = Arc::new(MemoryLedger::default());
    ledger.broken.store(true, Ordering::SeqCst);
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(typed::<BankAccount, MemoryStore, _>(MemoryLedgerHandler(
                ledger.clone(),
            )))
            .batch_size(4)
            .retry(FAST_RETRY)
            .on_error(OnError::Park),
        )
        .build()
        .expect("runner");
    // Catch-up past the poison event, which is parked. A wait begun before
    // the runner starts sees it parked on the way and says so; a wait begun
    // after it passed is plain.
    let target = written.last().expect("written").checkpoint();
    let waiting = tokio::spawn({
        let runner = runner.clone();
        async move { runner.wait_for(target, &["memory_ledger"], WAIT).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["memory_ledger"]).await;
    match waiting.await.expect("the wait") {
        Err(WaitError::Parked { event, .. }) => assert_eq!(event.position, Some(poison.position)),
        other => panic!("expected the parked event, got {other:?}"),
    }
    outflow::runner::wait_for(&store, target, &["memory_ledger"], WAIT)
        .await
        .expect("caught up");
    assert_eq!(ledger.positions(), healthy);
    let parked = runner
        .dead_letters("memory_ledger")
        .await
        .expect("dead letters");
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert_eq!(parked[0].event_id, poison.event_id);
    assert_eq!(parked[0].checkpoint, poison.checkpoint());
    assert_eq!(parked[0].event.aggregate_id, "acc-b");
    assert_eq!(parked[0].event.sequence, poison.sequence);
    assert_eq!(parked[0].event.position, Some(poison.position));
    assert_eq!(parked[0].event.event_type, "Deposited");
    assert_eq!(parked[0].error, "memory ledger refuses 666");
    assert!(parked[0].attempts >= 3, "{:?}", parked[0]);
    assert!(ledger.calls_of(poison.event_id) >= 3);
    // The typed handler only gets its aggregate's events.
    assert!(others.iter().all(|id| ledger.calls_of(*id) == 0));
    let status = common::wait_for_status(&runner, "memory_ledger", |s| {
        s.state == ProjectionState::Live
    })
    .await;
    assert_eq!(status.parked, 1);
    assert_eq!(status.lag_events, 0);

    // Live tail.
    let more = bus
        .execute("acc-b", BankCommand::Deposit { amount: 13 })
        .await
        .expect("deposit");
    runner
        .wait_for(
            more.checkpoint().expect("written"),
            &["memory_ledger"],
            WAIT,
        )
        .await
        .expect("live");
    assert_eq!(
        ledger
            .applied
            .lock()
            .expect("lock")
            .get(&more.events[0].position),
        Some(&("acc-b".to_owned(), 13))
    );

    // The parked event, retried after the fix.
    ledger.broken.store(false, Ordering::SeqCst);
    runner
        .retry_dead_letter("memory_ledger", parked[0].id)
        .await
        .expect("retry");
    assert!(runner
        .dead_letters("memory_ledger")
        .await
        .expect("dead letters")
        .is_empty());
    assert_eq!(
        ledger.applied.lock().expect("lock").get(&poison.position),
        Some(&("acc-b".to_owned(), POISON))
    );
    let total: i64 = ledger
        .applied
        .lock()
        .expect("lock")
        .values()
        .map(|(_, amount)| amount)
        .sum();
    assert_eq!(total, 10 + POISON + 11 - 6 + 12 + 13);

    // Without a runner, wait_for times out.
    shutdown.cancel();
    handle.await.expect("the runner stops");
    let late = bus
        .execute("acc-a", BankCommand::Deposit { amount: 1 })
        .await
        .expect("deposit");
    match runner
        .wait_for(
            late.checkpoint().expect("written"),
            &["memory_ledger"],
            Duration::from_millis(200),
        )
        .await
    {
        Err(WaitError::Timeout { projection, .. }) => assert_eq!(projection, "memory_ledger"),
        other => panic!("expected a timeout, got {other:?}"),
    }
}
