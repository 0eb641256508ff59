//! Durable timers on every SQL backend (and with a JetStream event store,
//! the timers in the read-model database): scheduled in the caller's
//! transaction, fired once the database's clock (moved by a test clock)
//! passes them, applied once, refusals recorded and never retried,
//! failover to a standby scheduler, and a rebuilt process manager that
//! schedules nothing again.

use outflow_tests as common;

use std::sync::Arc;
use std::time::Duration;

use example_accounts::{BankAccount, BankCommand};
use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::Aggregate;
use outflow::outbox::{Outbox, OutboxMessage, OutboxStore};
use outflow::process::{Process, ProcessManager};
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::store::ProjectionStore;
use outflow::timer::{
    Clock, Scheduled, Timer, TimerChange, TimerQuery, TimerState, TimerStore, Timers,
};
use outflow::view::ViewStore;
use outflow::{
    async_trait, CommandBus, CommandContext, EventLog, EventStore, HandlerError, LogFilter,
    RecordedEvent,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// An aggregate of the accounts' type whose commands are strings: a timer
/// made with it stores a command no account decodes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct NotAnAccount;

/// An aggregate type no scheduler is given a bus for.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Nobody;

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

macro_rules! string_aggregate {
    ($name:ident, $type:literal) => {
        impl Aggregate for $name {
            const TYPE: &'static str = $type;
            type Command = String;
            type Event = example_accounts::BankEvent;
            type Error = Never;
            type Services = ();

            async fn handle(
                &mut self,
                _: String,
                _: &(),
                _: &EventSink<Self>,
            ) -> Result<(), Never> {
                Ok(())
            }

            fn apply(&mut self, _: example_accounts::BankEvent) {}
        }
    };
}

string_aggregate!(NotAnAccount, "account");
string_aggregate!(Nobody, "nobody");

async fn state_of<T: TimerStore>(timers: &Timers<T>, key: &str) -> Option<TimerState> {
    timers
        .get(key)
        .await
        .expect("read the timer")
        .map(|t| t.state)
}

async fn wait_state<T: TimerStore>(timers: &Timers<T>, key: &str, state: TimerState) {
    common::eventually(&format!("timer `{key}` {state}"), WAIT, || async {
        match timers.get(key).await {
            Ok(Some(timer)) if timer.state == state => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

async fn balance<E: EventStore>(bus: &CommandBus<BankAccount, E>, id: &str) -> i64 {
    bus.load(id).await.expect("load").0.balance
}

fn deposit(key: &str, account: &str, amount: i64) -> Timer {
    Timer::command::<BankAccount>(key, account, &BankCommand::Deposit { amount })
        .expect("serialize")
}

/// The suite: timers in `store` (also the outbox's), commands to `events`.
async fn timers_behave<T, E>(store: T, events: E)
where
    T: TimerStore + OutboxStore<Database = <T as TimerStore>::Database>,
    E: EventStore + Clone + 'static,
{
    let clock = Clock::new();
    let timers = Timers::with_clock(&store, clock.clone())
        .await
        .expect("the timers table");
    let outbox = Outbox::new(&store).await.expect("the outbox");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(events.clone(), ()));
    bus.execute(
        "ta",
        BankCommand::Open {
            owner: "Ann".into(),
        },
    )
    .await
    .expect("open");

    // A schedule rolled back never exists; committed, it is pending.
    let mut tx = store.begin_timers().await.expect("begin");
    timers
        .schedule(&mut tx, deposit("rolled-back", "ta", 1))
        .await
        .expect("schedule");
    drop(tx);
    assert_eq!(state_of(&timers, "rolled-back").await, None);
    let mut tx = store.begin_timers().await.expect("begin");
    let first = timers
        .schedule(&mut tx, deposit("bonus", "ta", 5).after(HOUR))
        .await
        .expect("schedule");
    timers.commit(tx).await.expect("commit");
    assert_eq!(first, Scheduled::New);
    // The same key again keeps the pending timer; a reschedule moves it.
    let due = timers
        .get("bonus")
        .await
        .expect("get")
        .expect("bonus")
        .due_at;
    assert_eq!(
        timers
            .schedule_alone(deposit("bonus", "ta", 99).after(HOUR * 3))
            .await
            .expect("again"),
        Scheduled::Unchanged
    );
    let mut tx = store.begin_timers().await.expect("begin");
    assert_eq!(
        timers
            .reschedule(&mut tx, deposit("bonus", "ta", 5).after(HOUR * 2))
            .await
            .expect("reschedule"),
        Scheduled::Replaced
    );
    timers.commit(tx).await.expect("commit");
    let moved = timers.get("bonus").await.expect("get").expect("bonus");
    assert!(
        moved.due_at >= due + chrono::Duration::minutes(59),
        "{moved:?}"
    );
    assert_eq!(moved.state, TimerState::Pending);

    // Bad keys and due times no database stores are refused, typed.
    assert!(timers
        .schedule_alone(deposit("far", "ta", 1).after(Duration::from_secs(u64::MAX / 4)))
        .await
        .is_err());
    let long = "k".repeat(600);
    assert!(timers
        .schedule_alone(deposit(&long, "ta", 1))
        .await
        .is_err());
    assert!(timers.schedule_alone(deposit("", "ta", 1)).await.is_err());

    // A command already sent with the timer's id (a leader that died
    // before marking the timer fired) is recognized when the timer fires.
    let once = deposit("once", "ta", 7).after(HOUR);
    let once_id = once.as_new().command_id;
    timers.schedule_alone(once).await.expect("schedule");
    let context = CommandContext {
        command_id: once_id,
        ..CommandContext::new()
    };
    bus.execute_once("ta", BankCommand::Deposit { amount: 7 }, context)
        .await
        .expect("sent before the timer fired");

    // Due now: a refused withdrawal, a command that does not decode, a
    // target nobody serves, a message for the outbox, and a window's worth
    // more than a batch.
    timers
        .schedule_alone(
            Timer::command::<BankAccount>(
                "overdraw",
                "ta",
                &BankCommand::Withdraw { amount: 1_000_000 },
            )
            .expect("serialize"),
        )
        .await
        .expect("schedule");
    timers
        .schedule_alone(
            Timer::command::<NotAnAccount>("garbled", "ta", &"nonsense".to_owned())
                .expect("serialize"),
        )
        .await
        .expect("schedule");
    timers
        .schedule_alone(
            Timer::command::<Nobody>("orphan", "n-1", &"hello".to_owned()).expect("serialize"),
        )
        .await
        .expect("schedule");
    let message = OutboxMessage::new("k-1", "reminders", serde_json::json!({ "n": 1 }));
    let message_id = message.message_id;
    timers
        .schedule_alone(Timer::message("remind", message))
        .await
        .expect("schedule");
    let mut tx = store.begin_timers().await.expect("begin");
    for i in 0..45 {
        timers
            .schedule(&mut tx, deposit(&format!("many/{i}"), "ta", 1))
            .await
            .expect("schedule");
    }
    timers.commit(tx).await.expect("commit");

    let scheduler = timers
        .scheduler()
        .command(bus.clone())
        .outbox(outbox.clone())
        .node_id("only")
        .poll_interval(Duration::from_millis(100))
        .batch_size(10)
        .build()
        .expect("scheduler");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let scheduler = scheduler.clone();
        let shutdown = shutdown.clone();
        async move { scheduler.run(shutdown).await }
    });

    for i in 0..45 {
        wait_state(&timers, &format!("many/{i}"), TimerState::Fired).await;
    }
    wait_state(&timers, "overdraw", TimerState::Refused).await;
    wait_state(&timers, "garbled", TimerState::Failed).await;
    wait_state(&timers, "remind", TimerState::Fired).await;
    let overdraw = timers
        .get("overdraw")
        .await
        .expect("get")
        .expect("overdraw");
    assert!(
        overdraw
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("insufficient") || e.contains("funds")),
        "the refusal is recorded: {overdraw:?}"
    );
    assert_eq!(overdraw.attempts, 0, "a refusal is not an attempt to retry");
    let garbled = timers.get("garbled").await.expect("get").expect("garbled");
    assert!(garbled
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("decode")));
    // The orphan waits, loudly: attempts counted, the error names the target.
    let (orphan, _) = common::eventually("the orphan's attempts", WAIT, || async {
        match timers.get("orphan").await {
            Ok(Some(t)) if t.attempts > 0 => Ok(t),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(orphan.state, TimerState::Pending);
    assert!(orphan
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("command:nobody")));
    common::eventually("the scheduler's status names the orphan", WAIT, || async {
        let status = timers.status().await.map_err(|e| e.to_string())?;
        match (&status.scheduler, &status.last_error) {
            (Some(node), Some(error)) if node == "only" && error.contains("command:nobody") => {
                Ok(())
            }
            _ => Err(format!("{status:?}")),
        }
    })
    .await;
    assert!(timers.cancel_alone("orphan").await.expect("cancel"));
    // The message was enqueued once, with the timer's id.
    let pending = outbox.status().await.expect("outbox status");
    assert_eq!(pending.pending, 1, "{pending:?}");
    let remind = timers.get("remind").await.expect("get").expect("remind");
    assert_eq!(remind.command_id, message_id);

    // Nothing due within the hour fired.
    assert_eq!(state_of(&timers, "bonus").await, Some(TimerState::Pending));
    assert_eq!(balance(&bus, "ta").await, 7 + 45);
    let status = timers.status().await.expect("status");
    assert_eq!(status.counts.pending, 2, "{status:?}");
    assert_eq!(status.counts.overdue, 0, "{status:?}");
    assert_eq!(status.counts.refused, 1);
    assert_eq!(status.counts.failed, 1);
    let listed = timers
        .list(&TimerQuery {
            state: Some(TimerState::Pending),
            key_prefix: None,
            limit: 10,
        })
        .await
        .expect("list");
    let keys: Vec<_> = listed.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys, ["once", "bonus"], "earliest due first");

    // Two hours later, by the test's clock: both fire; the command sent
    // before is not applied again.
    clock.advance(HOUR * 2 + Duration::from_secs(1));
    wait_state(&timers, "bonus", TimerState::Fired).await;
    wait_state(&timers, "once", TimerState::Fired).await;
    assert_eq!(balance(&bus, "ta").await, 7 + 45 + 5);
    // The refusal stayed recorded; retried on request once the money is
    // there, it fires (with a new command id).
    assert_eq!(
        state_of(&timers, "overdraw").await,
        Some(TimerState::Refused)
    );
    bus.execute("ta", BankCommand::Deposit { amount: 1_000_000 })
        .await
        .expect("deposit");
    assert!(timers.retry("overdraw").await.expect("retry"));
    wait_state(&timers, "overdraw", TimerState::Fired).await;
    assert_eq!(balance(&bus, "ta").await, 7 + 45 + 5);

    // The bonus's event says where it came from.
    let (events_of_ta, _) = (bus.load("ta").await.expect("load"), ());
    assert!(events_of_ta.1 > 0);
    let stream = events
        .read_stream("account", "ta", 0, 1000)
        .await
        .expect("stream");
    let from_timer = stream
        .iter()
        .filter(|e| e.metadata.get("timer").map(String::as_str) == Some("bonus"))
        .count();
    assert_eq!(from_timer, 1, "one event from the bonus timer");

    // A fired key scheduled again is a new timer; cancelled, it stays so.
    assert_eq!(
        timers
            .schedule_alone(deposit("bonus", "ta", 5).after(HOUR))
            .await
            .expect("again"),
        Scheduled::New
    );
    assert!(timers.cancel_alone("bonus").await.expect("cancel"));
    assert!(!timers.cancel_alone("bonus").await.expect("cancel again"));
    assert_eq!(
        state_of(&timers, "bonus").await,
        Some(TimerState::Cancelled)
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the scheduler stops")
        .expect("its task")
        .expect("it ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_on_postgres() {
    let db = common::TestDb::new("timers_pg").await;
    let store = db.store().await;
    timers_behave(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_on_sqlite() {
    let dir = common::TestDir::new("timers_sqlite");
    let store = dir.sqlite().await;
    timers_behave(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_with_a_jetstream_store() {
    let db = common::TestDb::new("timers_js").await;
    let events = common::jetstream_store(&common::nats_url(), "timers", 1).await;
    timers_behave(db.store().await, events).await;
}

/// The mistake a user makes most: timers on a database whose migrations
/// did not run (the table dropped here) fail at once, naming the table and
/// what to do, on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_timers_table_is_named() {
    let db = common::TestDb::new("timers_missing_pg").await;
    let store = db.store().await;
    sqlx::query("DROP TABLE events_timers")
        .execute(store.pool())
        .await
        .expect("drop");
    let error = Timers::new(&store).await.expect_err("no table");
    let text = error.to_string();
    assert!(
        matches!(
            error,
            outflow::StoreError::Config(outflow::ConfigError::MissingTable { .. })
        ) && text.contains("events_timers")
            && text.contains("migrat"),
        "{text}"
    );

    let dir = common::TestDir::new("timers_missing_sqlite");
    let store = dir.sqlite().await;
    sqlx::query("DROP TABLE events_timers")
        .execute(store.writer())
        .await
        .expect("drop");
    let error = Timers::new(&store).await.expect_err("no table");
    let text = error.to_string();
    assert!(
        text.contains("events_timers") && text.contains("migrat"),
        "{text}"
    );
}

/// A leader that dies without giving its lease back: a standby scheduler
/// takes the lease once it runs out and fires what is due.
async fn fails_over<T: TimerStore + ProjectionStore + EventStore>(store: T) {
    let timers = Timers::new(&store).await.expect("timers");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    bus.execute(
        "fo",
        BankCommand::Open {
            owner: "Fay".into(),
        },
    )
    .await
    .expect("open");
    let scheduler = |node: &str| {
        timers
            .scheduler()
            .command(bus.clone())
            .node_id(node)
            .lease_ttl(Duration::from_secs(2))
            .heartbeat_interval(Duration::from_millis(300))
            .poll_interval(Duration::from_millis(100))
            .build()
            .expect("scheduler")
    };
    let first = scheduler("first");
    let crashed = tokio::spawn(async move { first.run(CancellationToken::new()).await });
    common::eventually("the first scheduler leads", WAIT, || async {
        match timers.status().await {
            Ok(status) if status.scheduler.as_deref() == Some("first") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let second = scheduler("second");
    let shutdown = CancellationToken::new();
    let standby = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { second.run(shutdown).await }
    });
    // The first dies: its task is dropped, its lease left to run out.
    crashed.abort();
    let _ = crashed.await;
    timers
        .schedule_alone(deposit("after-crash", "fo", 3))
        .await
        .expect("schedule");
    wait_state(&timers, "after-crash", TimerState::Fired).await;
    assert_eq!(
        timers.status().await.expect("status").scheduler.as_deref(),
        Some("second")
    );
    assert_eq!(balance(&bus, "fo").await, 3);
    shutdown.cancel();
    standby.await.expect("task").expect("ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_postgres() {
    let db = common::TestDb::new("timers_failover_pg").await;
    fails_over(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_on_sqlite() {
    let dir = common::TestDir::new("timers_failover_sqlite");
    fails_over(dir.sqlite().await).await;
}

/// A cancel committed after the scheduler read its window, before the
/// timer fell due, wins: the scheduler checks a due batch again before it
/// fires it.
async fn a_late_cancel_wins<T: TimerStore + EventStore>(store: T) {
    let timers = Timers::new(&store).await.expect("timers");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    bus.execute(
        "lc",
        BankCommand::Open {
            owner: "Lee".into(),
        },
    )
    .await
    .expect("open");
    // A poll far away: the window read when these commit is the one the
    // scheduler keeps.
    let scheduler = timers
        .scheduler()
        .command(bus.clone())
        .poll_interval(Duration::from_secs(60))
        .horizon(Duration::from_secs(60))
        .build()
        .expect("scheduler");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { scheduler.run(shutdown).await }
    });
    common::eventually("the scheduler leads", WAIT, || async {
        match timers.status().await {
            Ok(status) if status.scheduler.is_some() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let mut tx = timers.begin().await.expect("begin");
    for (key, amount, after) in [("now", 1, 0), ("cancelled", 10, 3), ("later", 100, 4)] {
        timers
            .schedule(
                &mut tx,
                deposit(key, "lc", amount).after(Duration::from_secs(after)),
            )
            .await
            .expect("schedule");
    }
    timers.commit(tx).await.expect("commit");
    // `now` fired: the window holding all three was read.
    wait_state(&timers, "now", TimerState::Fired).await;
    // Cancelled behind the scheduler's back (no wake-up, no new read).
    let mut tx = timers.begin().await.expect("begin");
    assert!(timers.cancel(&mut tx, "cancelled").await.expect("cancel"));
    tx.commit().await.expect("commit");
    wait_state(&timers, "later", TimerState::Fired).await;
    assert_eq!(
        state_of(&timers, "cancelled").await,
        Some(TimerState::Cancelled)
    );
    assert_eq!(
        balance(&bus, "lc").await,
        101,
        "the cancelled deposit was not sent"
    );
    shutdown.cancel();
    running.await.expect("task").expect("ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_wins_on_postgres() {
    let db = common::TestDb::new("timers_late_cancel_pg").await;
    a_late_cancel_wins(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_wins_on_sqlite() {
    let dir = common::TestDir::new("timers_late_cancel_sqlite");
    a_late_cancel_wins(dir.sqlite().await).await;
}

/// Timers whose target is missing wait for their next attempt in the
/// table: a window full of them never keeps a timer behind them from
/// firing.
async fn failing_timers_do_not_block<T: TimerStore + EventStore>(store: T) {
    let timers = Timers::new(&store).await.expect("timers");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    bus.execute(
        "ob",
        BankCommand::Open {
            owner: "Olga".into(),
        },
    )
    .await
    .expect("open");
    let mut tx = timers.begin().await.expect("begin");
    for i in 0..4 {
        timers
            .schedule(
                &mut tx,
                Timer::command::<Nobody>(format!("orphan/{i}"), "n", &"hi".to_owned())
                    .expect("serialize"),
            )
            .await
            .expect("schedule");
    }
    timers
        .schedule(
            &mut tx,
            deposit("behind", "ob", 4).after(Duration::from_secs(1)),
        )
        .await
        .expect("schedule");
    timers.commit(tx).await.expect("commit");
    let scheduler = timers
        .scheduler()
        .command(bus.clone())
        .batch_size(2)
        .poll_interval(Duration::from_millis(100))
        .build()
        .expect("scheduler");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { scheduler.run(shutdown).await }
    });
    wait_state(&timers, "behind", TimerState::Fired).await;
    assert_eq!(balance(&bus, "ob").await, 4);
    let orphan = timers.get("orphan/0").await.expect("get").expect("orphan");
    assert_eq!(orphan.state, TimerState::Pending);
    assert!(
        orphan.attempts > 0 && orphan.retry_at.is_some(),
        "{orphan:?}"
    );
    shutdown.cancel();
    running.await.expect("task").expect("ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_timers_do_not_block_on_postgres() {
    let db = common::TestDb::new("timers_orphans_pg").await;
    failing_timers_do_not_block(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_timers_do_not_block_on_sqlite() {
    let dir = common::TestDir::new("timers_orphans_sqlite");
    failing_timers_do_not_block(dir.sqlite().await).await;
}

/// Gives every opened account a bonus an hour later, unless it withdraws
/// first; a deposit after a withdrawal arms the bonus again (the same key,
/// scheduled by a later event).
struct Bonus<E: EventStore> {
    accounts: Arc<CommandBus<BankAccount, E>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Waiting {
    opened: bool,
    withdrew: bool,
    /// Whether the last event armed the bonus.
    armed: bool,
    /// Deposits seen.
    deposits: u32,
}

#[async_trait]
impl<E: EventStore> ProcessManager for Bonus<E> {
    type State = Waiting;
    type Command = ();

    fn name(&self) -> &str {
        "bonus"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"]).with_event_types([
            "AccountOpened",
            "Withdrawn",
            "Deposited",
        ])
    }

    fn process_id(&self, event: &RecordedEvent) -> Option<String> {
        Some(event.aggregate_id.clone())
    }

    fn react(&self, state: &mut Waiting, event: &RecordedEvent) -> Result<Vec<()>, HandlerError> {
        state.armed = false;
        match event.event_type.as_str() {
            "AccountOpened" => {
                state.opened = true;
                state.armed = true;
            }
            "Withdrawn" => state.withdrew = true,
            _ if state.withdrew => {
                state.deposits += 1;
                state.withdrew = false;
                state.armed = true;
            }
            _ => state.deposits += 1,
        }
        Ok(Vec::new())
    }

    fn timers(
        &self,
        state: &Waiting,
        event: &RecordedEvent,
    ) -> Result<Vec<TimerChange>, HandlerError> {
        let key = format!("bonus/{}", event.aggregate_id);
        // The first deposit schedules it again: kept (the key is pending),
        // but the deposit is now its latest cause.
        let first_deposit = event.event_type == "Deposited" && state.deposits == 1;
        Ok(if state.withdrew {
            vec![TimerChange::Cancel(key)]
        } else if state.armed || first_deposit {
            vec![TimerChange::Schedule(
                Timer::command::<BankAccount>(
                    key,
                    &event.aggregate_id,
                    &BankCommand::Deposit { amount: 1 },
                )?
                .after(HOUR),
            )]
        } else {
            Vec::new()
        })
    }

    async fn dispatch(&self, (): (), _: CommandContext) -> Result<(), HandlerError> {
        let _ = &self.accounts;
        Ok(())
    }
}

/// A process manager's timers commit with its batches, fire once due, and
/// a rebuild of the process — every event replayed — schedules none of
/// them again, revives no cancelled one.
async fn process_timers_survive_a_rebuild<S>(store: S)
where
    S: TimerStore + ProjectionStore + EventStore + EventLog + ViewStore,
    Timers<S>: outflow::timer::ApplyTimers<<S as outflow::Transactional>::Transaction>,
{
    let clock = Clock::new();
    let timers = Timers::with_clock(&store, clock.clone())
        .await
        .expect("timers");
    let accounts = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    let process = Process::new(
        Bonus {
            accounts: accounts.clone(),
        },
        &store,
        "bonus_processes",
    )
    .expect("process")
    .with_timers(timers.clone());
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(process))
        .scheduler(
            timers
                .scheduler()
                .command(accounts.clone())
                .poll_interval(Duration::from_millis(100))
                .build()
                .expect("scheduler"),
        )
        .build()
        .expect("runner");
    let (shutdown, running) = common::start_runner(&runner);
    for id in ["keeps", "spends", "comes_back"] {
        accounts
            .execute(id, BankCommand::Open { owner: id.into() })
            .await
            .expect("open");
    }
    accounts
        .execute("keeps", BankCommand::Deposit { amount: 10 })
        .await
        .expect("deposit");
    for id in ["spends", "comes_back"] {
        accounts
            .execute(id, BankCommand::Deposit { amount: 10 })
            .await
            .expect("deposit");
        accounts
            .execute(id, BankCommand::Withdraw { amount: 3 })
            .await
            .expect("withdraw");
    }
    // Armed again by a later event: the same key, another command id.
    let last = accounts
        .execute("comes_back", BankCommand::Deposit { amount: 5 })
        .await
        .expect("deposit again");
    runner
        .wait_for(last.checkpoint(), &["bonus"], WAIT)
        .await
        .expect("the process caught up");
    assert_eq!(
        state_of(&timers, "bonus/keeps").await,
        Some(TimerState::Pending)
    );
    assert_eq!(
        state_of(&timers, "bonus/spends").await,
        Some(TimerState::Cancelled)
    );
    assert_eq!(
        state_of(&timers, "bonus/comes_back").await,
        Some(TimerState::Pending)
    );
    let scheduled = timers
        .get("bonus/keeps")
        .await
        .expect("get")
        .expect("timer");
    assert_eq!(
        scheduled.metadata.get("process").map(String::as_str),
        Some("bonus")
    );
    let rearmed = timers
        .get("bonus/comes_back")
        .await
        .expect("get")
        .expect("timer");

    clock.advance(HOUR + Duration::from_secs(1));
    wait_state(&timers, "bonus/keeps", TimerState::Fired).await;
    wait_state(&timers, "bonus/comes_back", TimerState::Fired).await;
    let balances = || async {
        let mut all = Vec::new();
        for id in ["keeps", "spends", "comes_back"] {
            all.push(balance(&accounts, id).await);
        }
        all
    };
    assert_eq!(balances().await, [11, 7, 13]);

    // Rebuild: every event handled again, in a new epoch. The schedule of
    // `comes_back`'s opening (an earlier event, another command id) must
    // not replace the timer its later deposit set, nor its cancel touch it.
    let mut progress = runner.rebuild("bonus").await.expect("rebuild");
    common::eventually("the rebuild ends", WAIT, || {
        let done = *progress.borrow_and_update();
        async move {
            if done.total > 0 && done.done >= done.total {
                Ok(())
            } else {
                Err(format!("{done:?}"))
            }
        }
    })
    .await;
    let head = store.committed_head().await.expect("head");
    runner
        .wait_for(head, &["bonus"], WAIT)
        .await
        .expect("rebuilt");
    let after = timers
        .get("bonus/keeps")
        .await
        .expect("get")
        .expect("timer");
    assert_eq!(after.state, TimerState::Fired, "not scheduled again");
    assert_eq!(after.command_id, scheduled.command_id);
    assert_eq!(
        state_of(&timers, "bonus/spends").await,
        Some(TimerState::Cancelled)
    );
    let back = timers
        .get("bonus/comes_back")
        .await
        .expect("get")
        .expect("timer");
    assert_eq!(
        (back.state, back.command_id),
        (TimerState::Fired, rearmed.command_id)
    );
    // Whatever a replay might have scheduled would be due within two hours:
    // a sentinel due after it has fired once nothing is left pending.
    clock.advance(HOUR * 2);
    timers
        .schedule_alone(deposit("sentinel", "keeps", 100))
        .await
        .expect("sentinel");
    wait_state(&timers, "sentinel", TimerState::Fired).await;
    let status = timers.status().await.expect("status");
    assert_eq!(status.counts.pending, 0, "{status:?}");
    assert_eq!(balances().await, [111, 7, 13]);
    // The runner's node holds the timers' lease under a name of its own
    // (its projection leases' renewals leave it alone).
    let node = format!("{}:timers", runner.node_id());
    assert_eq!(
        status.scheduler.as_deref(),
        Some(node.as_str()),
        "{status:?}"
    );
    common::stop_runner(shutdown, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_timers_on_postgres() {
    let db = common::TestDb::new("timers_process_pg").await;
    process_timers_survive_a_rebuild(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_timers_on_sqlite() {
    let dir = common::TestDir::new("timers_process_sqlite");
    process_timers_survive_a_rebuild(dir.sqlite().await).await;
}
