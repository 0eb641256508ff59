//! The SQLite backend on real files: the log stays gap-free and in order
//! when a write transaction is held open, concurrent writers (tasks, and
//! stores on one file as separate processes would have) never fail with
//! "database is locked", a file held by another writer longer than the busy
//! timeout is a transient error that nothing parks for, the durability
//! settings are what the docs say, and projections, views and poison rows
//! behave as on PostgreSQL.

use outflow_tests as common;

use std::time::Duration;

use example_accounts::projections::{AccountView, BalanceRow, Balances, SqliteBalances};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use futures::TryStreamExt;
use outflow::projection::{ProjectionOptions, RetryPolicy};
use outflow::runner::{ProjectionRunner, WaitError};
use outflow::store::sqlite::{SqliteStore, Synchronous};
use outflow::store::ProjectionState;
use outflow::view::ViewProjection;
use outflow::{
    AppendInTransaction, AppendRequest, Checkpoint, CommandBus, ErrorKind, EventLog, EventStore,
    LogFilter, NewEvent, Transactional,
};
use serde_json::json;
use uuid::Uuid;

fn credit(aggregate: &str, version: u64) -> AppendRequest {
    AppendRequest {
        aggregate_type: "wallet".into(),
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
    }
}

async fn whole_log(store: &SqliteStore) -> Vec<outflow::RecordedEvent> {
    outflow::log::read_log(store, Checkpoint::START, LogFilter::all(), 100)
        .try_collect()
        .await
        .expect("read the log")
}

fn runner_builder(store: &SqliteStore) -> outflow::runner::ProjectionRunnerBuilder<SqliteStore> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_held_open_keeps_the_log_gap_free_and_in_commit_order() {
    let dir = common::TestDir::new("sqlite_late_commit");
    let store = dir.sqlite().await;

    // A transaction appends and stays open.
    let mut held = store.begin().await.expect("begin");
    let first = store
        .append_in(&mut held, credit("early", 0))
        .await
        .expect("append in the held transaction");
    // Another append now waits for the write lock.
    let later = tokio::spawn({
        let store = store.clone();
        async move { store.append(credit("late", 0)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !later.is_finished(),
        "a second writer wrote while the first held the lock"
    );
    // Readers see neither: nothing is committed.
    assert!(whole_log(&store).await.is_empty());
    assert_eq!(store.head().await.expect("head"), Checkpoint::START);

    store.commit(held).await.expect("commit");
    let later = later.await.expect("join").expect("the later append");
    let log = whole_log(&store).await;
    let positions: Vec<u64> = log.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![1, 2], "{log:#?}");
    assert_eq!(log[0].event_id, first[0].event_id);
    assert_eq!(log[1].event_id, later[0].event_id);
    assert!(log[0].checkpoint() < log[1].checkpoint());
    // A reader that had passed the first event resumes with the second.
    let after_first = store
        .read_log(log[0].checkpoint(), &LogFilter::all(), 10)
        .await
        .expect("resume");
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].event_id, later[0].event_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_one_file_never_see_database_is_locked() {
    let dir = common::TestDir::new("sqlite_writers");
    let path = dir.file("shared.db");
    // Two stores on one file: two write connections, as two processes have.
    let a = SqliteStore::open(&path).await.expect("store a");
    let b = SqliteStore::open(&path).await.expect("store b");
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let store = if writer % 2 == 0 {
            a.clone()
        } else {
            b.clone()
        };
        tasks.push(tokio::spawn(async move {
            for version in 0..40 {
                store
                    .append(credit(&format!("w{writer}"), version))
                    .await
                    .map_err(|e| outflow::error::error_chain(&e))?;
            }
            Ok::<_, String>(())
        }));
    }
    for task in tasks {
        task.await.expect("join").expect("every append succeeds");
    }
    let log = whole_log(&a).await;
    assert_eq!(log.len(), 320);
    let positions: Vec<u64> = log.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=320).collect::<Vec<_>>(), "gap-free");
    for writer in 0..8 {
        let stream: Vec<u64> = log
            .iter()
            .filter(|e| e.aggregate_id == format!("w{writer}"))
            .map(|e| e.sequence)
            .collect();
        assert_eq!(stream, (1..=40).collect::<Vec<_>>());
    }
    // Both stores read the same log.
    assert_eq!(whole_log(&b).await.len(), 320);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_locked_past_the_busy_timeout_is_transient_and_nothing_is_parked() {
    let dir = common::TestDir::new("sqlite_busy");
    let path = dir.file("busy.db");
    let store = SqliteStore::builder(&path)
        .busy_timeout(Duration::from_millis(200))
        .build()
        .await
        .expect("store");
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let opened = bus
        .execute(
            "acc",
            BankCommand::Open {
                owner: "ann".into(),
            },
        )
        .await
        .expect("open")
        .checkpoint()
        .expect("checkpoint");
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(SqliteBalances::new()).retry(RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(100),
            }),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_balances"]).await;
    runner
        .wait_for(opened, &["account_balances"], Duration::from_secs(20))
        .await
        .expect("the first event");

    // Another "process" (a store of its own on the file) takes the write
    // lock and keeps it past the busy timeout.
    let other = SqliteStore::open(&path).await.expect("another store");
    let lock = other.begin().await.expect("lock the file");
    let error = store
        .append(credit("w", 0))
        .await
        .expect_err("the file is locked");
    assert_eq!(error.kind(), ErrorKind::Transient, "{error:?}");
    assert!(error.is_retryable());
    // An event written by the lock holder reaches the runner only after the
    // lock is gone; meanwhile its batches fail as transient, never parked.
    let mut lock = lock;
    let from_other = other
        .append_in(&mut lock, {
            let mut request = credit("acc", 1);
            request.aggregate_type = "account".into();
            request.events[0] =
                NewEvent::from_event::<BankAccount>("acc", &BankEvent::Deposited { amount: 4 })
                    .expect("event");
            request
        })
        .await
        .expect("append under the lock");
    tokio::time::sleep(Duration::from_millis(600)).await;
    other.commit(lock).await.expect("release");
    runner
        .wait_for(
            from_other[0].checkpoint(),
            &["account_balances"],
            Duration::from_secs(20),
        )
        .await
        .expect("caught up after the lock");
    assert!(runner
        .dead_letters("account_balances")
        .await
        .expect("letters")
        .is_empty());
    let rows = SqliteBalances::rows(store.readers()).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].balance, 4);
    let second = store
        .append(credit("w", 0))
        .await
        .expect("append after the lock");
    assert_eq!(second[0].position, 3);
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durability_settings_are_applied_and_the_file_keeps_everything() {
    let dir = common::TestDir::new("sqlite_durable");
    let path = dir.file("durable.db");
    let checkpoint = {
        let store = SqliteStore::open(&path).await.expect("store");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(store.writer())
            .await
            .expect("journal mode");
        assert_eq!(mode, "wal");
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(store.writer())
            .await
            .expect("synchronous");
        assert_eq!(synchronous, 2, "FULL by default");
        let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
        bus.execute(
            "acc",
            BankCommand::Open {
                owner: "ann".into(),
            },
        )
        .await
        .expect("open");
        bus.execute("acc", BankCommand::Deposit { amount: 9 })
            .await
            .expect("deposit")
            .checkpoint()
            .expect("a checkpoint")
    };
    let normal = SqliteStore::builder(&path)
        .synchronous(Synchronous::Normal)
        .build()
        .await
        .expect("reopen");
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(normal.writer())
        .await
        .expect("synchronous");
    assert_eq!(synchronous, 1, "NORMAL when asked");
    assert_eq!(normal.head().await.expect("head"), checkpoint);
    let bus = CommandBus::<BankAccount, _>::new(normal.clone(), ());
    let (account, version) = bus.load("acc").await.expect("load");
    assert_eq!((account.balance, version), (9, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projections_and_views_run_on_sqlite_with_read_your_writes() {
    let dir = common::TestDir::new("sqlite_projections");
    let store = dir.sqlite().await;
    let view = ViewProjection::<BankAccount, AccountView>::new("account_view", "account_view")
        .expect("view");
    let accounts = view.query(&store);
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(SqliteBalances::new()).batch_size(7))
        .projection(ProjectionOptions::new(view).partitions(3))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let mut last = None;
    for i in 0..12 {
        let id = format!("acc-{i}");
        bus.execute(
            &id,
            BankCommand::Open {
                owner: format!("owner {i}"),
            },
        )
        .await
        .expect("open");
        for amount in 1..=3 {
            last = bus
                .execute(&id, BankCommand::Deposit { amount })
                .await
                .expect("deposit")
                .checkpoint();
        }
    }
    let view = accounts
        .load_after(last, "acc-11", Duration::from_secs(20))
        .await
        .expect("the view has the last deposit")
        .expect("a view row");
    assert_eq!((view.owner.as_str(), view.balance), ("owner 11", 6));
    runner
        .wait_for(
            last.expect("checkpoint"),
            &["account_balances"],
            Duration::from_secs(20),
        )
        .await
        .expect("balances");
    let rows = SqliteBalances::rows(store.readers()).await.expect("rows");
    assert_eq!(rows.len(), 12);
    assert!(
        rows.iter().all(|r| r.balance == 6 && r.events == 4),
        "{rows:?}"
    );
    let statuses = runner.status().await.expect("status");
    assert_eq!(statuses.len(), 4, "1 + 3 partitions");
    assert!(statuses
        .iter()
        .all(|s| s.lag_events == 0 && s.state == ProjectionState::Live));

    // A rebuild replays into the same file.
    let mut progress = runner.rebuild("account_balances").await.expect("rebuild");
    tokio::time::timeout(Duration::from_secs(20), async {
        while !progress.borrow().is_complete() {
            progress.changed().await.expect("progress");
        }
    })
    .await
    .expect("rebuilt");
    runner
        .wait_for(
            last.expect("checkpoint"),
            &["account_balances"],
            Duration::from_secs(20),
        )
        .await
        .expect("balances after the rebuild");
    assert_eq!(
        SqliteBalances::rows(store.readers()).await.expect("rows"),
        rows
    );
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_row_is_parked_and_a_missing_table_is_failing() {
    let dir = common::TestDir::new("sqlite_poison");
    let store = dir.sqlite().await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let mut written = Vec::new();
    for command in [
        BankCommand::Open {
            owner: "ann".into(),
        },
        BankCommand::Deposit { amount: 5 },
        BankCommand::Deposit { amount: 7 },
    ] {
        written.extend(bus.execute("acc", command).await.expect("command").events);
    }
    sqlx::query(
        "UPDATE events SET payload = '{\"Deposited\": {\"amount\": 1e400}}' WHERE position = ?1",
    )
    .bind(written[1].position as i64)
    .execute(store.writer())
    .await
    .expect("corrupt a row");
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(SqliteBalances::new()))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_balances"]).await;
    // Waiting for the bad event's own command reports it, however early the
    // runner got there.
    let target = Checkpoint::new(written[1].transaction_id, written[1].position);
    match runner
        .wait_for(target, &["account_balances"], Duration::from_secs(20))
        .await
    {
        Err(WaitError::Parked { event, .. }) => {
            assert_eq!(event.position, Some(written[1].position))
        }
        other => panic!("expected the bad row parked, got {other:?}"),
    }
    let last = Checkpoint::new(written[2].transaction_id, written[2].position);
    runner
        .wait_for(last, &["account_balances"], Duration::from_secs(20))
        .await
        .expect("past the bad row");
    let rows = SqliteBalances::rows(store.readers()).await.expect("rows");
    let mut expected = BalanceRow::default();
    Balances::fold(
        [
            &BankEvent::AccountOpened {
                owner: "ann".into(),
            },
            &BankEvent::Deposited { amount: 7 },
        ],
        "acc",
        &mut expected,
    );
    assert_eq!(rows, vec![expected]);

    // The read model's table goes missing: the projection fails loudly.
    sqlx::query("DROP TABLE account_balances")
        .execute(store.writer())
        .await
        .expect("drop");
    // (The bad row's aggregate no longer loads; another account writes.)
    let next = bus
        .execute(
            "other",
            BankCommand::Open {
                owner: "bob".into(),
            },
        )
        .await
        .expect("open")
        .checkpoint()
        .expect("checkpoint");
    match runner
        .wait_for(next, &["account_balances"], Duration::from_secs(60))
        .await
    {
        Err(WaitError::Failing { error, .. }) => {
            assert!(error.contains("account_balances"), "{error}");
        }
        other => panic!("expected Failing, got {other:?}"),
    }
    assert_eq!(
        runner
            .dead_letters("account_balances")
            .await
            .expect("letters")
            .len(),
        1
    );
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_are_validated_and_migrations_apply_once() {
    let dir = common::TestDir::new("sqlite_names");
    for bad in ["bank.events", "events; drop table x", "Events", ""] {
        let error = SqliteStore::builder(dir.file("names.db"))
            .events_table(bad)
            .build()
            .await
            .expect_err("a bad table name is refused");
        assert!(
            matches!(error, outflow::StoreError::InvalidIdentifier { .. }),
            "{bad}: {error:?}"
        );
    }
    let path = dir.file("ledger.db");
    let first = SqliteStore::builder(&path)
        .events_table("ledger")
        .build()
        .await
        .expect("first open");
    first.append(credit("w", 0)).await.expect("append");
    // Opened again, by this and by another "process": nothing is re-applied.
    let again = SqliteStore::builder(&path)
        .events_table("ledger")
        .build()
        .await
        .expect("second open");
    let other = SqliteStore::builder(&path)
        .events_table("other_events")
        .build()
        .await
        .expect("another events table in the same file");
    let ledger: Vec<(String, i64)> = sqlx::query_as(
        "SELECT events_table, version FROM outflow_migrations ORDER BY events_table, version",
    )
    .fetch_all(again.readers())
    .await
    .expect("ledger");
    assert_eq!(
        ledger,
        ["ledger", "other_events"]
            .into_iter()
            .flat_map(|table| (1..=8).map(move |v| (table.to_owned(), v)))
            .collect::<Vec<_>>(),
        "each migration once per events table: initial schema, outcomes, outbox, error kinds, operators' requests, timers, tags, subjects' keys"
    );
    assert_eq!(whole_log(&again).await.len(), 1);
    assert!(whole_log(&other).await.is_empty());
    // Without migrations, a file without the tables says which is missing.
    let bare = SqliteStore::builder(dir.file("bare.db"))
        .migrate(false)
        .build()
        .await
        .expect("open without migrating");
    let runner = runner_builder(&bare)
        .projection(ProjectionOptions::new(SqliteBalances::new()))
        .build()
        .expect("runner");
    let error = runner
        .run(tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("no tables");
    assert!(error.to_string().contains("events_projections"), "{error}");
}
