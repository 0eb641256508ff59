//! The scenarios: commands, commands with a read model, visible latency,
//! aggregate loads, and the server's own limit (pgbench).

use outflow::EventLog;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::EventStore as _;
use example_accounts::{BankAccount, BankCommand};
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::view::ViewProjection;
use outflow::{CommandBus, PostgresStore};
use postgres_es::PostgresEventRepository;
use sqlx::ConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::setup::*;
use crate::stats::*;

/// Opens `accounts` accounts, then runs `deposits` rounds of one deposit per
/// account from `clients` concurrent clients (each on its own accounts).
pub(crate) async fn commands(
    system: &System,
    accounts: usize,
    deposits: usize,
    clients: usize,
) -> Result<Rate> {
    let ids = open_accounts(system, accounts).await?;
    deposit_load(system, &ids, deposits, clients).await
}

/// Opens `accounts` accounts; returns their ids.
pub(crate) async fn open_accounts(system: &System, accounts: usize) -> Result<Vec<String>> {
    let ids: Vec<String> = (0..accounts).map(|i| format!("acc-{i:05}")).collect();
    for id in &ids {
        system
            .execute(id, BankCommand::Open { owner: id.clone() })
            .await?;
    }
    Ok(ids)
}

/// `deposits` deposits into each of `ids`, from `clients` concurrent
/// clients (each with its own accounts), timed.
pub(crate) async fn deposit_load(
    system: &System,
    ids: &[String],
    deposits: usize,
    clients: usize,
) -> Result<Rate> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let mine: Vec<String> = ids.iter().skip(client).step_by(clients).cloned().collect();
        let system = system.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(mine.len() * deposits);
            for _ in 0..deposits {
                for id in &mine {
                    let t = Instant::now();
                    system
                        .execute(id, BankCommand::Deposit { amount: 7 })
                        .await?;
                    latencies.push(t.elapsed());
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(rate(&mut latencies, started.elapsed()))
}

pub(crate) fn spawn_runner<S: outflow::ProjectionStore>(
    runner: &ProjectionRunner<S>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn({
        let runner = runner.clone();
        let shutdown = shutdown.clone();
        async move {
            if let Err(error) = runner.run(shutdown).await {
                eprintln!("runner failed: {error}");
            }
        }
    });
    (shutdown, handle)
}

pub(crate) struct ReadModelResult {
    pub(crate) outflow: Rate,
    pub(crate) outflow_caught_up_ms: f64,
    pub(crate) postgres_es: Rate,
}

pub(crate) async fn commands_with_read_model(
    server: &Server,
    size: &Size,
) -> Result<ReadModelResult> {
    let (system, store) = outflow_system(server, "rm_outflow").await?;
    let view = ViewProjection::<BankAccount, BalanceView>::new("balance_view", "balance_view")?;
    view.create_table(store.pool()).await?;
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(view))
        .build()?;
    let (shutdown, handle) = spawn_runner(&runner);
    let outflow = commands(&system, size.accounts, size.deposits, 1).await?;
    let head = store.head().await?;
    let t = Instant::now();
    runner
        .wait_for(head, &["balance_view"], Duration::from_secs(120))
        .await?;
    let outflow_caught_up_ms = t.elapsed().as_secs_f64() * 1000.0;
    shutdown.cancel();
    handle.await?;

    let (system, _) = postgres_es_system(server, "rm_pges", true, true).await?;
    let postgres_es = commands(&system, size.accounts, size.deposits, 1).await?;
    Ok(ReadModelResult {
        outflow,
        outflow_caught_up_ms,
        postgres_es,
    })
}

/// Commands at a steady rate; latency from sending a command until the read
/// model shows it (`wait_for` returns).
pub(crate) async fn visible_latency(
    server: &Server,
    per_second: u32,
    seconds: u64,
    flush: Flush,
) -> Result<(Rate, Spent)> {
    let (total, _, _, spent) = visible_latency_split(server, per_second, seconds, flush).await?;
    Ok((total, spent))
}

/// Whether the projection's batches wait for the server's WAL flush at
/// commit (the default) or not
/// (`PostgresStoreBuilder::synchronous_projection_commits(false)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    Waited,
    NotWaited,
}

/// As [`visible_latency`], also split into the command and the wait.
pub(crate) async fn visible_latency_split(
    server: &Server,
    per_second: u32,
    seconds: u64,
    flush: Flush,
) -> Result<(Rate, Rate, Rate, Spent)> {
    let (system, store) =
        crate::setup::outflow_system_flush(server, "latency", flush == Flush::Waited).await?;
    let view = ViewProjection::<BankAccount, BalanceView>::new("balance_view", "balance_view")?;
    view.create_table(store.pool()).await?;
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(view))
        .build()?;
    let (shutdown, handle) = spawn_runner(&runner);
    let accounts = 1_000;
    let ids: Vec<String> = (0..accounts).map(|i| format!("acc-{i:05}")).collect();
    for id in &ids {
        system
            .execute(id, BankCommand::Open { owner: id.clone() })
            .await?;
    }
    runner
        .wait_for(
            store.head().await?,
            &["balance_view"],
            Duration::from_secs(60),
        )
        .await?;
    let System::Outflow(bus) = system else {
        bail!("not outflow")
    };
    let total = per_second as u64 * seconds;
    let counting = statements_reset(store.pool()).await;
    let busy_before = machine_busy_seconds();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_second)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticker.tick().await;
        let bus = bus.clone();
        let runner = runner.clone();
        let id = ids[i as usize % accounts].clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let done = loop {
                match bus.execute(&id, BankCommand::Deposit { amount: 1 }).await {
                    Err(e) if e.is_conflict() => continue,
                    other => break other?,
                }
            };
            let command = t.elapsed();
            if let Some(checkpoint) = done.checkpoint() {
                runner
                    .wait_for(checkpoint, &["balance_view"], Duration::from_secs(60))
                    .await?;
            }
            Ok::<_, anyhow::Error>((t.elapsed(), command))
        }));
    }
    let mut totals = Vec::with_capacity(tasks.len());
    let mut commands = Vec::with_capacity(tasks.len());
    let mut waits = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (total, command) = task.await??;
        totals.push(total);
        commands.push(command);
        waits.push(total.saturating_sub(command));
    }
    let elapsed = started.elapsed();
    let cpu_seconds = machine_busy_seconds() - busy_before;
    let statements = if counting {
        Some(statements_read(store.pool()).await?)
    } else {
        None
    };
    shutdown.cancel();
    handle.await?;
    Ok((
        rate(&mut totals, elapsed),
        rate(&mut commands, elapsed),
        rate(&mut waits, elapsed),
        Spent {
            commands: total,
            statements,
            cpu_seconds,
        },
    ))
}

pub(crate) struct LoadResult {
    pub(crate) outflow_events_ms: f64,
    pub(crate) outflow_snapshot_ms: f64,
    pub(crate) postgres_es_events_ms: f64,
    pub(crate) postgres_es_snapshot_ms: f64,
}

pub(crate) async fn aggregate_loads(server: &Server, size: &Size) -> Result<LoadResult> {
    const EVENTS: usize = 1_000;
    // Outflow: one account with 1,000 events, written through a bus that
    // snapshots at 1,000.
    let (options, _) = server.fresh_db("load_outflow").await?;
    let store = PostgresStore::builder(pool(&options, 4, false).await?)
        .build()
        .await?;
    let snapshotting = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .snapshot_every(EVENTS as u64)
        .build();
    snapshotting
        .execute(
            "big",
            BankCommand::Open {
                owner: "big".into(),
            },
        )
        .await?;
    for _ in 1..EVENTS {
        snapshotting
            .execute("big", BankCommand::Deposit { amount: 1 })
            .await?;
    }
    let plain = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let time = |n: usize, elapsed: Duration| elapsed.as_secs_f64() * 1000.0 / n as f64;
    let started = Instant::now();
    for _ in 0..size.loads {
        let (_, version) = plain.load("big").await?;
        assert_eq!(version, EVENTS as u64);
    }
    let outflow_events_ms = time(size.loads, started.elapsed());
    let started = Instant::now();
    for _ in 0..size.loads {
        let (_, version) = snapshotting.load("big").await?;
        assert_eq!(version, EVENTS as u64);
    }
    let outflow_snapshot_ms = time(size.loads, started.elapsed());

    // postgres-es: the same, through its PersistedEventStore.
    let (options, _) = server.fresh_db("load_pges").await?;
    let pges_pool = pool(&options, 4, true).await?;
    postgres_es_schema(&pges_pool).await?;
    let cqrs =
        postgres_es::postgres_snapshot_cqrs::<BankAccount>(pges_pool.clone(), vec![], EVENTS, ());
    cqrs.execute(
        "big",
        BankCommand::Open {
            owner: "big".into(),
        },
    )
    .await?;
    for _ in 1..EVENTS {
        cqrs.execute("big", BankCommand::Deposit { amount: 1 })
            .await?;
    }
    let events_store = PersistedEventStore::<_, BankAccount>::new_event_store(
        PostgresEventRepository::new(pges_pool.clone()),
    );
    let snapshot_store = PersistedEventStore::<_, BankAccount>::new_snapshot_store(
        PostgresEventRepository::new(pges_pool.clone()),
        EVENTS,
    );
    let started = Instant::now();
    for _ in 0..size.loads {
        events_store.load_aggregate("big").await?;
    }
    let postgres_es_events_ms = time(size.loads, started.elapsed());
    let started = Instant::now();
    for _ in 0..size.loads {
        snapshot_store.load_aggregate("big").await?;
    }
    let postgres_es_snapshot_ms = time(size.loads, started.elapsed());
    Ok(LoadResult {
        outflow_events_ms,
        outflow_snapshot_ms,
        postgres_es_events_ms,
        postgres_es_snapshot_ms,
    })
}

/// The server's own limit: single-row autocommit inserts with pgbench.
pub(crate) async fn pgbench(server: &Server, clients: u32, seconds: u64) -> Result<f64> {
    let (options, name) = server.fresh_db("pgbench").await?;
    let pool = pool(&options, 2, true).await?;
    sqlx::query("CREATE TABLE raw_inserts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, payload json NOT NULL)")
        .execute(&pool)
        .await?;
    let script = std::env::temp_dir().join(format!("outflow-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "INSERT INTO raw_inserts (payload) VALUES ('{\"Deposited\":{\"amount\":7}}');\n",
    )?;
    let bin = std::env::var("OUTFLOW_PG_BIN").unwrap_or_else(|_| "/usr/bin".into());
    let host = options.get_host().to_owned();
    let port = options.get_port().to_string();
    let user = options.get_username().to_owned();
    let output = tokio::process::Command::new(format!("{bin}/pgbench"))
        .args([
            "-n",
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            &user,
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(&script)
        .arg(&name)
        .output()
        .await
        .context("running pgbench")?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| {
            format!(
                "no tps in pgbench output: {text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

pub(crate) async fn server_facts(server: &Server) -> Result<Vec<(String, String)>> {
    let mut conn = server.admin.connect().await?;
    let mut facts = Vec::new();
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    facts.push(("PostgreSQL".to_owned(), version));
    for setting in [
        "fsync",
        "synchronous_commit",
        "shared_buffers",
        "max_connections",
        "wal_level",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&mut conn)
            .await?;
        facts.push((setting.to_owned(), value));
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    facts.push(("cores".to_owned(), cores.to_string()));
    if let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(model) = cpuinfo.lines().find(|l| l.starts_with("model name")) {
            facts.push((
                "CPU".to_owned(),
                model.split(':').nth(1).unwrap_or("").trim().to_owned(),
            ));
        }
    }
    Ok(facts)
}
