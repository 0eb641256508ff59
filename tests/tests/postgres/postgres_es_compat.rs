//! Moving from postgres-es to Outflow: a database that postgres-es has been
//! writing to becomes an Outflow store in place. The migration numbers the
//! old rows (each exactly once in the global log, every stream in sequence
//! order), Outflow loads what postgres-es wrote, postgres-es keeps writing
//! afterwards (its rows get positions and transaction ids from the column
//! defaults, and log readers see them), postgres-es reads what Outflow wrote,
//! and migrating again changes nothing.

use outflow_tests as common;

use outflow::EventLog;
use std::collections::{BTreeMap, HashMap, HashSet};

use cqrs_es::persist::PersistedEventStore;
use example_accounts::{BankAccount, BankCommand, BankEvent};
use futures::TryStreamExt;
use outflow::{Checkpoint, CommandBus, CommandContext, LogFilter, PostgresStore, RecordedEvent};
use postgres_es::{PostgresCqrs, PostgresEventRepository};
use sqlx::{PgPool, Row};

/// postgres-es's `db/init.sql`: its events and snapshots tables, verbatim.
const POSTGRES_ES_SCHEMA: &str = "
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
";

const ACCOUNTS: usize = 5;
const ROUNDS: usize = 6;
const SEEDED: usize = ACCOUNTS * ROUNDS;

/// The event a command on a healthy account emits.
fn event_of(command: &BankCommand) -> BankEvent {
    match command {
        BankCommand::Open { owner } => BankEvent::AccountOpened {
            owner: owner.clone(),
        },
        BankCommand::Deposit { amount } => BankEvent::Deposited { amount: *amount },
        BankCommand::Withdraw { amount } => BankEvent::Withdrawn { amount: *amount },
        BankCommand::Close => BankEvent::AccountClosed,
        BankCommand::TransferOut {
            transfer_id,
            amount,
        } => BankEvent::TransferredOut {
            transfer_id: transfer_id.clone(),
            amount: *amount,
        },
        BankCommand::TransferIn {
            transfer_id,
            amount,
        } => BankEvent::TransferredIn {
            transfer_id: transfer_id.clone(),
            amount: *amount,
        },
        BankCommand::Refund {
            transfer_id,
            amount,
        } => BankEvent::Refunded {
            transfer_id: transfer_id.clone(),
            amount: *amount,
        },
    }
}

/// What the tests expect: every account's state and every event in the
/// order it was written.
#[derive(Default)]
struct Model {
    accounts: BTreeMap<String, BankAccount>,
    versions: BTreeMap<String, u64>,
    /// (aggregate id, sequence, event), in write order.
    written: Vec<(String, u64, BankEvent)>,
}

impl Model {
    fn record(&mut self, id: &str, command: &BankCommand) {
        let event = event_of(command);
        cqrs_es::Aggregate::apply(
            self.accounts.entry(id.to_owned()).or_default(),
            event.clone(),
        );
        let version = self.versions.entry(id.to_owned()).or_default();
        *version += 1;
        self.written.push((id.to_owned(), *version, event));
    }

    fn state(&self, id: &str) -> (BankAccount, u64) {
        (
            self.accounts.get(id).cloned().unwrap_or_default(),
            self.versions.get(id).copied().unwrap_or(0),
        )
    }
}

async fn pg_es_execute(
    cqrs: &PostgresCqrs<BankAccount>,
    model: &mut Model,
    id: &str,
    command: BankCommand,
) {
    model.record(id, &command);
    cqrs.execute(id, command)
        .await
        .expect("postgres-es executes the command");
}

fn account(i: usize) -> String {
    format!("acc-{i}")
}

/// A fresh database with postgres-es's schema and 5 accounts x 6 commands
/// written through postgres-es, interleaved across accounts.
async fn seeded(label: &str) -> (PgPool, PostgresCqrs<BankAccount>, Model) {
    let db = common::TestDb::new(label).await;
    let pool = db.pool(10).await;
    sqlx::raw_sql(POSTGRES_ES_SCHEMA)
        .execute(&pool)
        .await
        .expect("create postgres-es's schema");
    let cqrs = postgres_es::postgres_cqrs::<BankAccount>(pool.clone(), vec![], ());
    let mut model = Model::default();
    for round in 0..ROUNDS {
        for k in 0..ACCOUNTS {
            let i = (k + round * 2) % ACCOUNTS;
            let amount = i64::try_from(i).expect("small") + 1;
            let command = match round {
                0 => BankCommand::Open {
                    owner: format!("owner {i}"),
                },
                1 => BankCommand::Deposit {
                    amount: 100 * amount,
                },
                2 => BankCommand::Withdraw {
                    amount: 10 * amount,
                },
                3 => BankCommand::Deposit { amount: 7 },
                4 => BankCommand::Withdraw { amount: 5 },
                _ => BankCommand::Deposit {
                    amount: 1000 + amount,
                },
            };
            pg_es_execute(&cqrs, &mut model, &account(i), command).await;
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .expect("count events");
    assert_eq!(rows, SEEDED as i64);
    (pool, cqrs, model)
}

/// postgres-es's own view of an aggregate: its repository, replaying events.
async fn pg_es_load(pool: &PgPool, id: &str) -> (BankAccount, u64) {
    let store = PersistedEventStore::<PostgresEventRepository, BankAccount>::new_event_store(
        PostgresEventRepository::new(pool.clone()),
    );
    let context = cqrs_es::EventStore::load_aggregate(&store, id)
        .await
        .expect("postgres-es loads the aggregate");
    (context.aggregate, context.current_sequence as u64)
}

/// (position, aggregate id, sequence, transaction id, event id) of every row, by position.
async fn rows_by_position(pool: &PgPool) -> Vec<(i64, String, i64, String, uuid::Uuid)> {
    sqlx::query(
        "SELECT position, aggregate_id, sequence, transaction_id::text AS txid, event_id \
           FROM events ORDER BY position",
    )
    .fetch_all(pool)
    .await
    .expect("read the events table")
    .iter()
    .map(|row| {
        (
            row.try_get("position").expect("position"),
            row.try_get("aggregate_id").expect("aggregate_id"),
            row.try_get("sequence").expect("sequence"),
            row.try_get("txid").expect("transaction_id"),
            row.try_get("event_id").expect("event_id"),
        )
    })
    .collect()
}

fn ids_and_sequences(events: &[RecordedEvent]) -> Vec<(String, u64)> {
    events
        .iter()
        .map(|e| (e.aggregate_id.clone(), e.sequence))
        .collect()
}

fn expected_ids_and_sequences(written: &[(String, u64, BankEvent)]) -> Vec<(String, u64)> {
    written
        .iter()
        .map(|(id, sequence, _)| (id.clone(), *sequence))
        .collect()
}

/// Each event decodes to what was written.
fn assert_payloads(events: &[RecordedEvent], written: &[(String, u64, BankEvent)]) {
    assert_eq!(events.len(), written.len());
    for (event, (id, sequence, payload)) in events.iter().zip(written) {
        let envelope = event
            .clone()
            .decode::<BankAccount>(&[])
            .expect("a postgres-es event decodes");
        assert_eq!(
            (&envelope.aggregate_id, envelope.sequence, &envelope.payload),
            (id, *sequence, payload)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_numbers_postgres_es_rows_and_outflow_loads_them() {
    let (pool, _cqrs, model) = seeded("pges_migrate").await;
    let store = PostgresStore::builder(pool.clone())
        .build()
        .await
        .expect("the migration runs on a postgres-es database");

    // Every old row got a distinct position, in the order the rows were
    // written, and all of them the migration's transaction id.
    let rows = rows_by_position(&pool).await;
    assert_eq!(rows.len(), SEEDED);
    let positions: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(positions, (1..=SEEDED as i64).collect::<Vec<_>>());
    let order: Vec<(String, u64)> = rows
        .iter()
        .map(|r| (r.1.clone(), u64::try_from(r.2).expect("sequence")))
        .collect();
    assert_eq!(
        order,
        expected_ids_and_sequences(&model.written),
        "positions must follow the order postgres-es wrote the rows in"
    );
    let transactions: HashSet<&String> = rows.iter().map(|r| &r.3).collect();
    assert_eq!(
        transactions.len(),
        1,
        "one migration transaction: {transactions:?}"
    );
    let event_ids: HashSet<uuid::Uuid> = rows.iter().map(|r| r.4).collect();
    assert_eq!(
        event_ids.len(),
        SEEDED,
        "every old row got its own event id"
    );

    // The global log has each of them exactly once, streams in sequence order.
    let log = common::read_until(&store, Checkpoint::START, &LogFilter::all(), SEEDED).await;
    assert_eq!(
        ids_and_sequences(&log),
        expected_ids_and_sequences(&model.written)
    );
    assert_payloads(&log, &model.written);
    let mut next_sequence: HashMap<&str, u64> = HashMap::new();
    for event in &log {
        let next = next_sequence
            .entry(event.aggregate_id.as_str())
            .or_insert(1);
        assert_eq!(event.sequence, *next, "{} out of order", event.aggregate_id);
        *next += 1;
        assert!(event.metadata.is_empty() && event.correlation_id.is_none());
    }
    let tail = store
        .read_log(
            log.last().expect("non-empty").checkpoint(),
            &LogFilter::all(),
            100,
        )
        .await
        .expect("read past the end");
    assert!(tail.is_empty(), "{tail:?}");
    // The batched stream agrees, across batch boundaries.
    let streamed: Vec<RecordedEvent> =
        outflow::log::read_log(&store, Checkpoint::START, LogFilter::all(), 7)
            .try_collect()
            .await
            .expect("stream the log");
    assert_eq!(streamed, log);
    let filtered = common::read_until(
        &store,
        Checkpoint::START,
        &LogFilter::aggregate_types(["account"]).with_event_types(["AccountOpened"]),
        ACCOUNTS,
    )
    .await;
    assert_eq!(filtered.len(), ACCOUNTS);

    // Outflow loads what postgres-es loads, and what the model says.
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    for i in 0..ACCOUNTS {
        let id = account(i);
        let outflow = bus.load(&id).await.expect("Outflow loads");
        assert_eq!(outflow, model.state(&id), "{id}");
        assert_eq!(outflow, pg_es_load(&pool, &id).await, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_es_and_outflow_keep_writing_after_migration() {
    let (pool, cqrs, mut model) = seeded("pges_continue").await;
    let store = PostgresStore::builder(pool.clone())
        .build()
        .await
        .expect("the migration runs on a postgres-es database");
    let migrated = common::read_until(&store, Checkpoint::START, &LogFilter::all(), SEEDED).await;
    assert_eq!(migrated.len(), SEEDED);
    let checkpoint = migrated.last().expect("non-empty").checkpoint();
    let migration_txid = checkpoint.transaction_id;

    // postgres-es goes on writing with its own 7-column INSERT, on new and old accounts.
    let already = model.written.len();
    let more = [
        (
            account(5),
            BankCommand::Open {
                owner: "new".into(),
            },
        ),
        (account(0), BankCommand::Deposit { amount: 11 }),
        (
            account(6),
            BankCommand::Open {
                owner: "newer".into(),
            },
        ),
        (account(5), BankCommand::Deposit { amount: 500 }),
        (account(3), BankCommand::Withdraw { amount: 20 }),
        (account(6), BankCommand::Deposit { amount: 60 }),
        (account(1), BankCommand::Deposit { amount: 1 }),
        (account(0), BankCommand::Withdraw { amount: 11 }),
    ];
    for (id, command) in more {
        pg_es_execute(&cqrs, &mut model, &id, command).await;
    }
    model.record(&account(4), &BankCommand::Deposit { amount: 9 });
    cqrs.execute_with_metadata(
        &account(4),
        BankCommand::Deposit { amount: 9 },
        HashMap::from([("user".to_owned(), "pg-es".to_owned())]),
    )
    .await
    .expect("postgres-es executes with metadata");
    let new_written = &model.written[already..];

    // The new rows got positions and transaction ids from the column defaults.
    let rows = rows_by_position(&pool).await;
    assert_eq!(rows.len(), model.written.len());
    let new_rows = &rows[SEEDED..];
    let new_positions: Vec<i64> = new_rows.iter().map(|r| r.0).collect();
    assert!(
        new_positions.windows(2).all(|w| w[0] < w[1]) && new_positions[0] > SEEDED as i64,
        "{new_positions:?}"
    );
    let new_txids: HashSet<&String> = new_rows.iter().map(|r| &r.3).collect();
    assert_eq!(
        new_txids.len(),
        new_rows.len(),
        "one transaction per postgres-es command"
    );

    // A reader continuing after the migrated rows gets exactly the new events.
    let fresh = common::read_until(&store, checkpoint, &LogFilter::all(), new_written.len()).await;
    assert_eq!(
        ids_and_sequences(&fresh),
        expected_ids_and_sequences(new_written)
    );
    assert_payloads(&fresh, new_written);
    assert!(
        fresh.iter().all(|e| e.transaction_id > migration_txid),
        "new rows sort after the migrated ones"
    );
    assert!(fresh
        .windows(2)
        .all(|w| w[0].checkpoint() < w[1].checkpoint()));
    let with_metadata = fresh.last().expect("non-empty");
    assert_eq!(
        with_metadata.metadata.get("user").map(String::as_str),
        Some("pg-es")
    );
    let after_fresh = fresh.last().expect("non-empty").checkpoint();
    let tail = store
        .read_log(after_fresh, &LogFilter::all(), 100)
        .await
        .expect("read past the end");
    assert!(tail.is_empty(), "{tail:?}");

    // Outflow writes to a migrated account and to one postgres-es created after the migration.
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let mut outflow_written = Vec::new();
    for (id, command) in [
        (account(2), BankCommand::Deposit { amount: 300 }),
        (account(5), BankCommand::Withdraw { amount: 100 }),
    ] {
        model.record(&id, &command);
        let committed = bus
            .execute_with(
                &id,
                command,
                CommandContext::new().with_metadata("user", "outflow"),
            )
            .await
            .expect("Outflow executes on a postgres-es stream");
        assert_eq!(committed.version, model.state(&id).1, "{id}");
        outflow_written.push(model.written.last().expect("recorded").clone());
    }

    // postgres-es reads Outflow's rows (it selects only its 7 columns) and writes after them.
    for id in [account(2), account(5)] {
        assert_eq!(pg_es_load(&pool, &id).await, model.state(&id), "{id}");
    }
    let envelopes = cqrs_es::EventStore::load_events(
        &PersistedEventStore::<PostgresEventRepository, BankAccount>::new_event_store(
            PostgresEventRepository::new(pool.clone()),
        ),
        &account(2),
    )
    .await
    .expect("postgres-es loads the events");
    let last = envelopes.last().expect("events");
    assert_eq!(
        (last.sequence, &last.payload),
        (7, &BankEvent::Deposited { amount: 300 })
    );
    assert_eq!(
        last.metadata.get("user").map(String::as_str),
        Some("outflow")
    );
    pg_es_execute(
        &cqrs,
        &mut model,
        &account(2),
        BankCommand::Withdraw { amount: 50 },
    )
    .await;
    outflow_written.push(model.written.last().expect("recorded").clone());
    for i in 0..7 {
        let id = account(i);
        let expected = model.state(&id);
        assert_eq!(
            bus.load(&id).await.expect("Outflow loads"),
            expected,
            "{id}"
        );
        assert_eq!(pg_es_load(&pool, &id).await, expected, "{id}");
    }

    // The log goes on: Outflow's events, then postgres-es's, in write order.
    let last_three = common::read_until(
        &store,
        after_fresh,
        &LogFilter::all(),
        outflow_written.len(),
    )
    .await;
    assert_eq!(
        ids_and_sequences(&last_three),
        expected_ids_and_sequences(&outflow_written)
    );
    assert_payloads(&last_three, &outflow_written);
    assert!(last_three[0].correlation_id.is_some() && last_three[1].correlation_id.is_some());
    assert!(
        last_three[2].correlation_id.is_none(),
        "written by postgres-es"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_twice_changes_nothing() {
    let (pool, _cqrs, model) = seeded("pges_twice").await;
    let first = PostgresStore::builder(pool.clone())
        .build()
        .await
        .expect("first migration");
    let before = rows_by_position(&pool).await;
    assert_eq!(before.len(), SEEDED);
    let columns = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT column_name::text FROM information_schema.columns \
              WHERE table_schema = 'public' AND table_name = 'events' ORDER BY ordinal_position",
        )
        .fetch_all(&pool)
        .await
        .expect("list columns")
    };
    let columns_before = columns(pool.clone()).await;
    assert_eq!(columns_before.len(), 13, "{columns_before:?}");

    let second = PostgresStore::builder(pool.clone())
        .build()
        .await
        .expect("second build");
    PostgresStore::migrate(&pool, "events")
        .await
        .expect("explicit migration");
    let ledger: Vec<(String, i32)> =
        sqlx::query("SELECT events_table, version FROM outflow_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .expect("read the ledger")
            .iter()
            .map(|row| {
                (
                    row.try_get("events_table").expect("events_table"),
                    row.try_get("version").expect("version"),
                )
            })
            .collect();
    // One row per migration (events log, projection tables, outbox, dead
    // messages, leases, command outcomes, error kinds, operators'
    // requests, timers, tags, subjects' keys, presence locks), each once.
    assert_eq!(
        ledger,
        (1..=12)
            .map(|v| ("events".to_owned(), v))
            .collect::<Vec<_>>()
    );
    assert_eq!(rows_by_position(&pool).await, before, "positions unchanged");
    assert_eq!(columns(pool.clone()).await, columns_before);

    // Both stores see the same log and go on numbering after the old rows.
    let log_first = common::read_until(&first, Checkpoint::START, &LogFilter::all(), SEEDED).await;
    let log_second =
        common::read_until(&second, Checkpoint::START, &LogFilter::all(), SEEDED).await;
    assert_eq!(log_first, log_second);
    let bus = CommandBus::<BankAccount, _>::new(second.clone(), ());
    let committed = bus
        .execute(&account(0), BankCommand::Deposit { amount: 1 })
        .await
        .expect("write after the second migration");
    assert_eq!(committed.version, model.state(&account(0)).1 + 1);
    assert_eq!(committed.events[0].position, SEEDED as u64 + 1);
}
