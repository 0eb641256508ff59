//! A `cqrs-es` `View` run by Outflow's `ViewProjection` writes the rows that
//! postgres-es's own `GenericQuery` writes for the same commands (view id,
//! version, JSON payload), keeps doing so live, rebuilds to the same rows, and
//! can gather several aggregates into one row with `keyed_by`.

use outflow_tests as common;

use outflow::EventLog;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cqrs_es::persist::GenericQuery;
use cqrs_es::{AggregateError, EventEnvelope, View};
use example_accounts::projections::AccountView;
use example_accounts::{BankAccount, BankCommand};
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::view::ViewProjection;
use outflow::{Checkpoint, CommandBus, LogFilter, PostgresStore};
use postgres_es::{PostgresCqrs, PostgresViewRepository};
use sqlx::{PgPool, Row};

const WAIT: Duration = Duration::from_secs(60);

/// The table postgres-es's `GenericQuery` writes (its `db/init.sql` layout).
const PG_ES_TABLE: &str = "account_query";
/// The table Outflow's `ViewProjection` writes.
const OUTFLOW_TABLE: &str = "account_view";

type AccountQuery =
    GenericQuery<PostgresViewRepository<AccountView, BankAccount>, AccountView, BankAccount>;

/// One row of a view table: view id, version, payload.
type ViewRow = (String, i64, serde_json::Value);

async fn view_rows(pool: &PgPool, table: &str) -> Vec<ViewRow> {
    sqlx::query(&format!(
        "SELECT view_id, version, payload FROM {table} ORDER BY view_id"
    ))
    .fetch_all(pool)
    .await
    .expect("read a view table")
    .iter()
    .map(|row| {
        (
            row.try_get("view_id").expect("view_id"),
            row.try_get("version").expect("version"),
            row.try_get("payload").expect("payload"),
        )
    })
    .collect()
}

/// Commands over six accounts, some of them refused by the aggregate (a
/// refused command writes nothing and reaches no view).
fn script(round: usize) -> Vec<(String, BankCommand)> {
    let mut commands = Vec::new();
    if round == 0 {
        for i in 0..6 {
            commands.push((
                format!("acc-{i}"),
                BankCommand::Open {
                    owner: format!("owner {i}"),
                },
            ));
        }
    }
    for step in 0..40 {
        let i = (step * 5 + round) % 6;
        let amount = i64::try_from((step * 7 + round * 3) % 50 + 1).expect("small");
        let command = match step % 4 {
            0 | 1 => BankCommand::Deposit { amount },
            // Sometimes more than the balance: refused.
            2 => BankCommand::Withdraw { amount: amount * 3 },
            _ => BankCommand::Withdraw { amount: 1 },
        };
        commands.push((format!("acc-{i}"), command));
    }
    commands
}

/// Runs commands through postgres-es; returns how many were accepted and
/// refused.
async fn run_pg_es(
    cqrs: &PostgresCqrs<BankAccount>,
    commands: Vec<(String, BankCommand)>,
) -> (usize, usize) {
    let (mut accepted, mut refused) = (0, 0);
    for (id, command) in commands {
        match cqrs.execute(&id, command).await {
            Ok(()) => accepted += 1,
            Err(AggregateError::UserError(_)) => refused += 1,
            Err(error) => panic!("postgres-es failed on {id}: {error}"),
        }
    }
    (accepted, refused)
}

/// One database holding Outflow's store, postgres-es writing commands to the
/// same `events` table with a `GenericQuery` on `account_query`, and the
/// Outflow view table `account_view`.
struct Fixture {
    store: PostgresStore,
    cqrs: PostgresCqrs<BankAccount>,
    accepted: usize,
}

impl Fixture {
    async fn new(label: &str) -> Fixture {
        let db = common::TestDb::new(label).await;
        let store = db.store().await;
        let pool = store.pool().clone();
        sqlx::query(&format!(
            "CREATE TABLE {PG_ES_TABLE} (
                view_id text                        NOT NULL,
                version bigint CHECK (version >= 0) NOT NULL,
                payload json                        NOT NULL,
                PRIMARY KEY (view_id))"
        ))
        .execute(&pool)
        .await
        .expect("create postgres-es's view table");
        view_projection()
            .create_table(&pool)
            .await
            .expect("create Outflow's view table");
        let mut query = AccountQuery::new(Arc::new(PostgresViewRepository::new(
            PG_ES_TABLE,
            pool.clone(),
        )));
        query.use_error_handler(Box::new(|error| {
            panic!("postgres-es's query failed: {error}")
        }));
        let cqrs = postgres_es::postgres_cqrs::<BankAccount>(pool, vec![Box::new(query)], ());
        let (accepted, refused) = run_pg_es(&cqrs, script(0)).await;
        assert!(
            accepted > 20 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
        Fixture {
            store,
            cqrs,
            accepted,
        }
    }

    fn runner(&self) -> ProjectionRunner<PostgresStore> {
        ProjectionRunner::builder(self.store.clone())
            .heartbeat_interval(Duration::from_millis(200))
            .lease_ttl(Duration::from_secs(3))
            // Small batches: one view's events span several of them.
            .projection(ProjectionOptions::new(view_projection()).batch_size(7))
            .build()
            .expect("runner")
    }

    /// The checkpoint of the last account event in the log, once `expected`
    /// events are readable.
    async fn last_checkpoint(&self, expected: usize) -> Checkpoint {
        common::read_until(
            &self.store,
            Checkpoint::START,
            &LogFilter::aggregate_types(["account"]),
            expected,
        )
        .await
        .last()
        .expect("events were written")
        .checkpoint()
    }

    async fn assert_tables_equal(&self) {
        let pool = self.store.pool();
        let pg_es = view_rows(pool, PG_ES_TABLE).await;
        let outflow = view_rows(pool, OUTFLOW_TABLE).await;
        assert_eq!(pg_es.len(), 6, "{pg_es:#?}");
        assert!(
            pg_es.iter().all(|(_, version, _)| *version > 1),
            "{pg_es:#?}"
        );
        assert_eq!(outflow, pg_es);
    }
}

fn view_projection() -> ViewProjection<BankAccount, AccountView> {
    ViewProjection::<BankAccount, AccountView>::new("account_view", OUTFLOW_TABLE)
        .expect("a valid table name")
}

/// Waits until the store's head (what log readers may read up to) has
/// passed `target`.
async fn head_reaches(store: &PostgresStore, target: Checkpoint) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.head().await.expect("head") < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the head never reached {target}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn view_projection_writes_the_rows_generic_query_writes() {
    let fixture = Fixture::new("view_same_rows").await;
    let runner = fixture.runner();
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_view"]).await;

    // Catch-up over what postgres-es wrote before the runner started.
    let target = fixture.last_checkpoint(fixture.accepted).await;
    runner
        .wait_for(target, &["account_view"], WAIT)
        .await
        .expect("the view catches up");
    fixture.assert_tables_equal().await;

    // Live: postgres-es goes on writing while the runner follows.
    let (accepted, _) = run_pg_es(&fixture.cqrs, script(1)).await;
    let target = fixture.last_checkpoint(fixture.accepted + accepted).await;
    runner
        .wait_for(target, &["account_view"], WAIT)
        .await
        .expect("the view follows");
    fixture.assert_tables_equal().await;

    // The adapter reads its rows back as the view type.
    let rows = view_rows(fixture.store.pool(), PG_ES_TABLE).await;
    let (id, _, payload) = &rows[0];
    let loaded = view_projection()
        .load(fixture.store.pool(), id)
        .await
        .expect("load")
        .expect("the view exists");
    let expected: AccountView = serde_json::from_value(payload.clone()).expect("a view");
    assert_eq!(loaded, expected);
    assert_eq!(
        view_projection()
            .load(fixture.store.pool(), "no-such-account")
            .await
            .expect("load"),
        None
    );

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilding_a_view_produces_the_same_rows_again() {
    let fixture = Fixture::new("view_rebuild").await;
    let runner = fixture.runner();
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_view"]).await;
    let target = fixture.last_checkpoint(fixture.accepted).await;
    runner
        .wait_for(target, &["account_view"], WAIT)
        .await
        .expect("the view catches up");
    fixture.assert_tables_equal().await;

    // Damage the view table: a row changed, a row that should not exist.
    let pool = fixture.store.pool();
    sqlx::query(&format!(
        "UPDATE {OUTFLOW_TABLE} SET version = 99, payload = '{{\"owner\":\"ghost\",\"balance\":0,\"ledger\":[],\"closed\":true}}' WHERE view_id = 'acc-0'"
    ))
    .execute(pool)
    .await
    .expect("damage a row");
    sqlx::query(&format!(
        "INSERT INTO {OUTFLOW_TABLE} (view_id, version, payload) VALUES ('ghost', 1, '{{}}')"
    ))
    .execute(pool)
    .await
    .expect("add a stray row");
    assert_ne!(
        view_rows(pool, OUTFLOW_TABLE).await,
        view_rows(pool, PG_ES_TABLE).await
    );

    // The rebuild counts the events up to the log's head; make sure that
    // head is past every event (an open transaction anywhere on the server
    // holds it back for a moment).
    head_reaches(&fixture.store, target).await;
    let mut progress = runner.rebuild("account_view").await.expect("rebuild");
    assert_eq!(progress.borrow().total, fixture.accepted as u64);
    let last = tokio::time::timeout(WAIT, async {
        while progress.changed().await.is_ok() {}
        *progress.borrow()
    })
    .await
    .expect("the rebuild completes");
    assert_eq!(
        (last.done, last.total),
        (fixture.accepted as u64, fixture.accepted as u64)
    );
    runner
        .wait_for(target, &["account_view"], WAIT)
        .await
        .expect("the rebuilt view catches up");
    fixture.assert_tables_equal().await;

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

/// Account ids start with the owner's name; the key is its initial.
fn owner_initial(aggregate_id: &str) -> Option<String> {
    let initial = aggregate_id.chars().next()?.to_ascii_uppercase();
    // Accounts of owners starting with X are not wanted in this view.
    (initial != 'X').then(|| initial.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_by_gathers_several_accounts_into_one_row() {
    let db = common::TestDb::new("view_keyed").await;
    let store = db.store().await;
    let view = ViewProjection::<BankAccount, AccountView>::new("by_initial", "by_initial")
        .expect("a valid table name")
        .keyed_by(|event| owner_initial(&event.aggregate_id));
    view.create_table(store.pool()).await.expect("view table");

    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let commands = [
        (
            "alice-1",
            BankCommand::Open {
                owner: "Alice".into(),
            },
        ),
        (
            "bob-1",
            BankCommand::Open {
                owner: "Bob".into(),
            },
        ),
        (
            "alice-2",
            BankCommand::Open {
                owner: "Alice".into(),
            },
        ),
        (
            "xavier-1",
            BankCommand::Open {
                owner: "Xavier".into(),
            },
        ),
        ("alice-1", BankCommand::Deposit { amount: 100 }),
        ("alice-2", BankCommand::Deposit { amount: 40 }),
        ("bob-1", BankCommand::Deposit { amount: 7 }),
        ("xavier-1", BankCommand::Deposit { amount: 1000 }),
        ("alice-1", BankCommand::Withdraw { amount: 30 }),
        ("alice-2", BankCommand::Withdraw { amount: 40 }),
        ("alice-2", BankCommand::Close),
        ("bob-1", BankCommand::Withdraw { amount: 2 }),
        ("alice-1", BankCommand::Deposit { amount: 5 }),
    ];
    // The expected rows: each key's view folded over its accounts' events in
    // the order they were written; the version counts those commands.
    let mut expected: BTreeMap<String, (i64, AccountView)> = BTreeMap::new();
    let mut target = Checkpoint::START;
    for (id, command) in commands {
        let committed = bus.execute(id, command).await.expect("the command runs");
        target = committed.checkpoint().expect("an event was written");
        let Some(key) = owner_initial(id) else {
            continue;
        };
        let (version, view) = expected.entry(key).or_default();
        *version += 1;
        for event in &committed.events {
            view.update(&EventEnvelope {
                aggregate_id: id.to_owned(),
                sequence: usize::try_from(event.sequence).expect("small"),
                payload: event.payload.clone(),
                metadata: Default::default(),
            });
        }
    }
    // Alice's two accounts in one row, in write order.
    assert_eq!(
        expected["A"].1.ledger,
        vec!["+100", "+40", "-30", "-40", "+5"]
    );

    let runner = ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
        .projection(ProjectionOptions::new(view).batch_size(3))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["by_initial"]).await;
    runner
        .wait_for(target, &["by_initial"], WAIT)
        .await
        .expect("the view catches up");

    let rows = view_rows(store.pool(), "by_initial").await;
    let expected_rows: Vec<ViewRow> = expected
        .iter()
        .map(|(key, (version, view))| {
            (
                key.clone(),
                *version,
                serde_json::to_value(view).expect("serialize a view"),
            )
        })
        .collect();
    assert_eq!(rows, expected_rows);
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["A", "B"]
    );

    // Rebuilt, the rows are the same again.
    runner.rebuild("by_initial").await.expect("rebuild");
    runner
        .wait_for(target, &["by_initial"], WAIT)
        .await
        .expect("the rebuilt view catches up");
    assert_eq!(view_rows(store.pool(), "by_initial").await, expected_rows);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}
