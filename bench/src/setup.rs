//! The systems under test: the servers, the Outflow and postgres-es
//! systems on them, the SQLite store, and seeded logs.

use std::sync::Arc;

use anyhow::Result;
use cqrs_es::persist::GenericQuery;
use cqrs_es::{EventEnvelope, Query, View};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::store::jetstream::JetStreamStore;
use outflow::store::sqlite::Synchronous;
use outflow::{AppendRequest, CommandBus, EventStore, NewEvent, PostgresStore, SqliteStore};
use postgres_es::PostgresViewRepository;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// A balance view for both systems (cqrs-es `View`).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct BalanceView {
    pub(crate) balance: i64,
    pub(crate) movements: u64,
}

impl View<BankAccount> for BalanceView {
    fn update(&mut self, event: &EventEnvelope<BankAccount>) {
        self.movements += 1;
        self.balance += event.payload.balance_change();
    }
}

pub(crate) struct Server {
    pub(crate) admin: PgConnectOptions,
    pub(crate) counter: std::sync::atomic::AtomicU32,
}

impl Server {
    pub(crate) async fn fresh_db(&self, label: &str) -> Result<(PgConnectOptions, String)> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("bench_{label}_{n}_{}", std::process::id());
        let mut conn = self.admin.connect().await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await?;
        let options = self.admin.clone().database(&name);
        Ok((options, name))
    }
}

pub(crate) async fn pool(options: &PgConnectOptions, size: u32, ping: bool) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(size)
        .test_before_acquire(ping)
        .connect_with(options.clone())
        .await?)
}

pub(crate) async fn postgres_es_schema(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE events (
            aggregate_type text NOT NULL, aggregate_id text NOT NULL,
            sequence bigint CHECK (sequence >= 0) NOT NULL,
            event_type text NOT NULL, event_version text NOT NULL,
            payload json NOT NULL, metadata json NOT NULL,
            PRIMARY KEY (aggregate_type, aggregate_id, sequence));
         CREATE TABLE snapshots (
            aggregate_type text NOT NULL, aggregate_id text NOT NULL,
            last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
            current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
            payload json NOT NULL,
            PRIMARY KEY (aggregate_type, aggregate_id, last_sequence));
         CREATE TABLE balance_view (
            view_id text NOT NULL, version bigint CHECK (version >= 0) NOT NULL,
            payload json NOT NULL, PRIMARY KEY (view_id));",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The two systems' command paths behind one interface.
#[derive(Clone)]
pub(crate) enum System {
    Outflow(Arc<CommandBus<BankAccount, PostgresStore>>),
    OutflowSqlite(Arc<CommandBus<BankAccount, SqliteStore>>),
    OutflowJetStream(Arc<CommandBus<BankAccount, JetStreamStore>>),
    PostgresEs(Arc<postgres_es::PostgresCqrs<BankAccount>>),
}

impl System {
    pub(crate) async fn execute(&self, id: &str, command: BankCommand) -> Result<()> {
        match self {
            System::Outflow(bus) => {
                bus.execute(id, command).await?;
            }
            System::OutflowSqlite(bus) => {
                bus.execute(id, command).await?;
            }
            System::OutflowJetStream(bus) => {
                bus.execute(id, command).await?;
            }
            System::PostgresEs(cqrs) => cqrs.execute(id, command).await?,
        }
        Ok(())
    }
}

pub(crate) async fn outflow_system(
    server: &Server,
    label: &str,
) -> Result<(System, PostgresStore)> {
    outflow_system_with(server, label, 0).await
}

pub(crate) async fn outflow_system_with(
    server: &Server,
    label: &str,
    cache: usize,
) -> Result<(System, PostgresStore)> {
    outflow_system_built(server, label, cache, true).await
}

/// As [`outflow_system`], with projection batches that wait for the WAL
/// flush at commit (`synchronous`) or not.
pub(crate) async fn outflow_system_flush(
    server: &Server,
    label: &str,
    synchronous: bool,
) -> Result<(System, PostgresStore)> {
    outflow_system_built(server, label, 0, synchronous).await
}

async fn outflow_system_built(
    server: &Server,
    label: &str,
    cache: usize,
    synchronous_projection_commits: bool,
) -> Result<(System, PostgresStore)> {
    let (options, _) = server.fresh_db(label).await?;
    let store = PostgresStore::builder(pool(&options, 20, false).await?)
        .synchronous_projection_commits(synchronous_projection_commits)
        .build()
        .await?;
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .cache_aggregates(cache)
        .build();
    Ok((System::Outflow(Arc::new(bus)), store))
}

/// A directory for the SQLite files of this run, removed at the end.
pub(crate) fn sqlite_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("outflow-bench-{}", std::process::id()))
}

/// Outflow on a new SQLite file with its default settings (WAL,
/// `synchronous = FULL`: every command is on disk when it returns), or with
/// `synchronous = NORMAL` for a label ending in `_normal`.
pub(crate) async fn sqlite_system(label: &str) -> Result<(System, SqliteStore)> {
    let dir = sqlite_dir();
    std::fs::create_dir_all(&dir)?;
    let synchronous = if label.ends_with("_normal") {
        Synchronous::Normal
    } else {
        Synchronous::Full
    };
    let store = SqliteStore::builder(dir.join(format!("{label}.db")))
        .synchronous(synchronous)
        .build()
        .await?;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    Ok((System::OutflowSqlite(Arc::new(bus)), store))
}

/// Writes `events` bank events over `accounts` accounts into a SQLite file
/// through the store (100 events per append; `synchronous = NORMAL` while
/// seeding only).
pub(crate) async fn seed_sqlite(
    path: &std::path::Path,
    events: usize,
    accounts: usize,
) -> Result<()> {
    let store = SqliteStore::builder(path)
        .synchronous(Synchronous::Normal)
        .build()
        .await?;
    let per_account = events / accounts;
    for a in 0..accounts {
        let id = format!("acc-{a:06}");
        let mut version = 0u64;
        while (version as usize) < per_account {
            let n = 100.min(per_account - version as usize);
            let batch = (0..n)
                .map(|i| {
                    let s = version as usize + i + 1;
                    let event = if s == 1 {
                        BankEvent::AccountOpened {
                            owner: format!("owner {a}"),
                        }
                    } else {
                        BankEvent::Deposited {
                            amount: (s % 100 + 1) as i64,
                        }
                    };
                    NewEvent::from_event::<BankAccount>(&id, &event)
                })
                .collect::<Result<Vec<_>, _>>()?;
            store
                .append(AppendRequest {
                    aggregate_type: "account".into(),
                    aggregate_id: id.clone(),
                    expected_version: version,
                    events: batch,
                })
                .await?;
            version += n as u64;
        }
    }
    Ok(())
}

/// postgres-es on a fresh database: with sqlx's standard pool (`ping`: a
/// round trip to test each connection on checkout, its default) or tuned
/// without it.
pub(crate) async fn postgres_es_system(
    server: &Server,
    label: &str,
    with_view: bool,
    ping: bool,
) -> Result<(System, PgPool)> {
    let (options, _) = server.fresh_db(label).await?;
    let pool = pool(&options, 20, ping).await?;
    postgres_es_schema(&pool).await?;
    let mut queries: Vec<Box<dyn Query<BankAccount>>> = Vec::new();
    if with_view {
        let repo = Arc::new(PostgresViewRepository::<BalanceView, BankAccount>::new(
            "balance_view",
            pool.clone(),
        ));
        queries.push(Box::new(GenericQuery::new(repo)));
    }
    let cqrs = postgres_es::postgres_cqrs(pool.clone(), queries, ());
    Ok((System::PostgresEs(Arc::new(cqrs)), pool))
}

/// Writes `events` bank events over `accounts` accounts straight into an
/// events table with SQL (Outflow's columns come from their defaults).
pub(crate) async fn seed_events(pool: &PgPool, events: usize, accounts: usize) -> Result<()> {
    let per_account = events / accounts;
    let chunk = 1_000.min(accounts);
    for start in (0..accounts).step_by(chunk) {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'account', 'acc-' || lpad(a::text, 6, '0'), s,
                    CASE WHEN s = 1 THEN 'AccountOpened' ELSE 'Deposited' END, '1.0',
                    CASE WHEN s = 1 THEN json_build_object('AccountOpened', json_build_object('owner', 'owner ' || a))
                         ELSE json_build_object('Deposited', json_build_object('amount', s % 100 + 1)) END,
                    '{}'::json
               FROM generate_series($1::int, $2::int) a, generate_series(1, $3::int) s
              ORDER BY s, a",
        )
        .bind(start as i32)
        .bind((start + chunk).min(accounts) as i32 - 1)
        .bind(per_account as i32)
        .execute(pool)
        .await?;
    }
    sqlx::query("ANALYZE events").execute(pool).await?;
    Ok(())
}

/// Cancels `token` when this process's standard input closes: how a parent
/// stops a child process of the benchmark gracefully.
pub(crate) fn cancel_when_stdin_closes(token: &tokio_util::sync::CancellationToken) {
    let token = token.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        token.cancel();
    });
}
