//! What a command and a projected event cost each part of the system — the
//! client's CPU, the servers' CPU, the bytes written — measured on this
//! machine for the scaling model of the book (`docs/src/scaling.md`), and
//! the model's predictions checked against runs with more partitions and
//! more runner processes.
//!
//! CPU times come from `/proc/<pid>/stat` (Linux): the benchmark's own
//! process, every process of the PostgreSQL server (the postmaster, its
//! live children, and what its exited children left in its own counters),
//! the three nats-server processes of the cluster (`OUTFLOW_NATS_CLUSTER_PIDS`),
//! and the runner child processes.

use std::fmt::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use example_accounts::projections::Balances;
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::store::Checkpoints;
use outflow::{EventLog, PostgresStore};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::jetstream::*;
use crate::scenarios::*;
use crate::setup::*;
use crate::stats::*;

/// Linux's USER_HZ: the unit of the times in `/proc/<pid>/stat`.
const TICKS_PER_SECOND: f64 = 100.0;

/// A process's CPU seconds: its own, and its waited-for children's.
fn process_cpu(pid: u32) -> Option<(f64, f64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields start after its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let ppid = fields.get(1)?.parse().ok()?;
    let own = (get(11)? + get(12)?) / TICKS_PER_SECOND;
    let children = (get(13)? + get(14)?) / TICKS_PER_SECOND;
    Some((own, children, ppid))
}

/// CPU seconds of this process so far.
fn own_cpu() -> f64 {
    process_cpu(std::process::id()).map_or(0.0, |(own, _, _)| own)
}

/// CPU seconds of the PostgreSQL server so far: the postmaster with what its
/// exited children left it, and each live child's own.
fn server_cpu(postmaster: u32) -> f64 {
    let mut total = process_cpu(postmaster).map_or(0.0, |(own, children, _)| own + children);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((own, _, ppid)) = process_cpu(pid) {
                if ppid == postmaster {
                    total += own;
                }
            }
        }
    }
    total
}

/// The PostgreSQL server's postmaster: the parent of a backend of `pool`.
async fn postmaster(pool: &PgPool) -> Result<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await?;
    let backend = u32::try_from(backend)?;
    process_cpu(backend)
        .map(|(_, _, ppid)| ppid)
        .context("cannot read the server's processes in /proc (is the server on this machine?)")
}

/// The cluster's nats-server PIDs, from `OUTFLOW_NATS_CLUSTER_PIDS`.
fn nats_pids() -> Result<Vec<u32>> {
    let pids = std::env::var("OUTFLOW_NATS_CLUSTER_PIDS")
        .context("OUTFLOW_NATS_CLUSTER_PIDS is not set: run scripts/bench.sh")?;
    pids.split(',')
        .map(|p| p.trim().parse::<u32>().context("a nats-server PID"))
        .collect()
}

/// What one command cost, averaged over a run.
pub(crate) struct CommandCost {
    pub(crate) label: String,
    pub(crate) commands: usize,
    pub(crate) per_second: f64,
    /// The share of the machine's two cores busy during the run.
    pub(crate) busy: f64,
    /// Milliseconds of the client's CPU per command.
    pub(crate) client_ms: f64,
    /// Milliseconds of CPU per command of each server process (PostgreSQL:
    /// one entry, the whole server; JetStream: each nats-server, busiest
    /// first).
    pub(crate) servers_ms: Vec<f64>,
    /// Bytes of WAL per command (PostgreSQL).
    pub(crate) wal_bytes: Option<f64>,
    /// Bytes per event in the events table with its indexes (PostgreSQL).
    pub(crate) row_bytes: Option<f64>,
}

impl CommandCost {
    fn server_ms(&self) -> f64 {
        self.servers_ms.iter().sum()
    }
}

/// What projecting one event cost, with `processes` runner processes.
pub(crate) struct RunnerCost {
    pub(crate) processes: usize,
    pub(crate) per_second: f64,
    pub(crate) busy: f64,
    /// CPU milliseconds per 1,000 events of the runner processes.
    pub(crate) client_ms: f64,
    /// CPU milliseconds per 1,000 events of the PostgreSQL server.
    pub(crate) server_ms: f64,
}

pub(crate) struct Scaling {
    pub(crate) commands: Vec<CommandCost>,
    pub(crate) runners: Vec<RunnerCost>,
    pub(crate) cores: f64,
}

/// Runs `deposits` deposits per account from `clients` clients, measuring
/// the CPU of this process and of `servers`.
async fn measure(
    label: String,
    system: &System,
    accounts: usize,
    deposits: usize,
    clients: usize,
    servers: &dyn Fn() -> Vec<f64>,
) -> Result<(CommandCost, Duration)> {
    let ids = open_accounts(system, accounts).await?;
    let (busy0, own0, servers0) = (machine_busy_seconds(), own_cpu(), servers());
    let started = Instant::now();
    let rate = deposit_load(system, &ids, deposits, clients).await?;
    let elapsed = started.elapsed();
    let (busy1, own1, servers1) = (machine_busy_seconds(), own_cpu(), servers());
    let commands = accounts * deposits;
    let per = |seconds: f64| seconds * 1000.0 / commands as f64;
    let mut servers_ms: Vec<f64> = servers1
        .iter()
        .zip(&servers0)
        .map(|(after, before)| per(after - before))
        .collect();
    servers_ms.sort_by(|a, b| b.total_cmp(a));
    Ok((
        CommandCost {
            label,
            commands,
            per_second: rate.per_second,
            busy: (busy1 - busy0) / elapsed.as_secs_f64() / cores(),
            client_ms: per(own1 - own0),
            servers_ms,
            wal_bytes: None,
            row_bytes: None,
        },
        elapsed,
    ))
}

/// The machine's cores.
fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

async fn postgres_costs(server: &Server, size: &Size, clients: usize) -> Result<CommandCost> {
    let (system, store) = outflow_system(server, &format!("scaling_c{clients}")).await?;
    let master = postmaster(store.pool()).await?;
    let lsn = || async {
        sqlx::query_scalar::<_, String>("SELECT pg_current_wal_lsn()::text")
            .fetch_one(store.pool())
            .await
    };
    let (accounts, deposits) = if size.quick { (400, 5) } else { (2_000, 5) };
    let before = lsn().await?;
    let (mut cost, _) = measure(
        format!(
            "PostgreSQL, {clients} client{}",
            if clients == 1 { "" } else { "s" }
        ),
        &system,
        accounts,
        deposits,
        clients,
        &|| vec![server_cpu(master)],
    )
    .await?;
    let after = lsn().await?;
    let wal: f64 = sqlx::query_scalar("SELECT pg_wal_lsn_diff($1::pg_lsn, $2::pg_lsn)::float8")
        .bind(&after)
        .bind(&before)
        .fetch_one(store.pool())
        .await?;
    // Opening the accounts wrote WAL too; the deposits are most of it.
    cost.wal_bytes = Some(wal / (accounts * (deposits + 1)) as f64);
    let (bytes, events): (i64, i64) =
        sqlx::query_as("SELECT pg_total_relation_size('events'), (SELECT count(*) FROM events)")
            .fetch_one(store.pool())
            .await?;
    cost.row_bytes = Some(bytes as f64 / events.max(1) as f64);
    Ok(cost)
}

async fn jetstream_costs(size: &Size, partitions: u32) -> Result<CommandCost> {
    let pids = nats_pids()?;
    let (system, store) =
        jetstream_system(&format!("scaling_p{partitions}"), partitions, 0).await?;
    let (accounts, deposits) = if size.quick { (400, 5) } else { (2_000, 5) };
    let (cost, _) = measure(
        format!(
            "JetStream, {partitions} partition{}, 16 clients",
            if partitions == 1 { "" } else { "s" }
        ),
        &system,
        accounts,
        deposits,
        16,
        &|| {
            pids.iter()
                .map(|pid| process_cpu(*pid).map_or(0.0, |(own, _, _)| own))
                .collect()
        },
    )
    .await?;
    let mut cost = cost;
    // Bytes per stored message, from the streams' own counts (one replica).
    let urls = std::env::var("NATS_CLUSTER_URL").context("NATS_CLUSTER_URL is not set")?;
    let client = async_nats::ConnectOptions::new()
        .connect(urls.split(',').map(str::to_owned).collect::<Vec<_>>())
        .await?;
    let context = async_nats::jetstream::new(client);
    let (mut bytes, mut messages) = (0u64, 0u64);
    for partition in 0..partitions {
        let name = store
            .stream_name(partition)
            .context("a partition without a stream")?
            .to_owned();
        let mut stream = context.get_stream(&name).await?;
        let state = stream.info().await?.state.clone();
        bytes += state.bytes;
        messages += state.messages;
    }
    cost.row_bytes = Some(bytes as f64 / messages.max(1) as f64);
    Ok(cost)
}

/// In a child process: runs the scaling projection (`NAME`, 4 partitions)
/// as node `NODE` until its standard input closes.
pub(crate) async fn scaling_runner_child(url: &str, name: &str, node: &str) -> Result<()> {
    let options: PgConnectOptions = url.parse()?;
    let store = PostgresStore::builder(pool(&options, 6, false).await?)
        .build()
        .await?;
    let runner = ProjectionRunner::builder(store)
        .node_id(node)
        .heartbeat_interval(Duration::from_millis(200))
        .projection(
            ProjectionOptions::new(Balances::named(name))
                .partitions(4)
                .batch_size(2_000),
        )
        .build()?;
    let shutdown = CancellationToken::new();
    cancel_when_stdin_closes(&shutdown);
    Ok(runner.run(shutdown).await?)
}

/// Catches a 4-partition projection up on a seeded log with `processes`
/// runner processes; measures from the moment every process owns its share
/// until the first unit reaches the head (or 4 s).
async fn runner_costs(
    url: &str,
    store: &PostgresStore,
    master: u32,
    processes: usize,
) -> Result<RunnerCost> {
    let name = format!("scaling_runners_{processes}");
    // Each run projects into an empty table.
    sqlx::query("TRUNCATE account_balances")
        .execute(store.pool())
        .await?;
    let mut children: Vec<Child> = Vec::new();
    for i in 0..processes {
        children.push(
            Command::new(std::env::current_exe()?)
                .args([
                    "scaling-runner",
                    url,
                    &name,
                    &format!("scaling-{processes}-{i}"),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a runner process")?,
        );
    }
    let pids: Vec<u32> = children.iter().filter_map(Child::id).collect();
    let children_cpu = || -> f64 {
        pids.iter()
            .map(|pid| process_cpu(*pid).map_or(0.0, |(own, _, _)| own))
            .sum()
    };
    let head = store.head().await?.position;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Wait until each process owns its share (4 units over `processes`).
    loop {
        let units = store.units(Some(&name)).await?;
        let mut owners: Vec<&str> = units
            .iter()
            .filter(|u| u.lease_valid)
            .filter_map(|u| u.owner.as_deref())
            .collect();
        owners.sort_unstable();
        owners.dedup();
        if units.len() == 4
            && owners.len() == processes.min(4)
            && units.iter().all(|u| u.lease_valid)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the runner processes did not share the projection within 120 s: {units:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let processed =
        |units: &[outflow::store::UnitRecord]| -> u64 { units.iter().map(|u| u.processed).sum() };
    let units = store.units(Some(&name)).await?;
    let (done0, busy0, client0, server0, started) = (
        processed(&units),
        machine_busy_seconds(),
        children_cpu(),
        server_cpu(master),
        Instant::now(),
    );
    let (done1, busy1, client1, server1, elapsed) = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let units = store.units(Some(&name)).await?;
        let first_done = units.iter().any(|u| u.checkpoint.position >= head);
        if first_done || started.elapsed() > Duration::from_secs(4) {
            break (
                processed(&units),
                machine_busy_seconds(),
                children_cpu(),
                server_cpu(master),
                started.elapsed(),
            );
        }
    };
    for child in &mut children {
        drop(child.stdin.take());
    }
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        let _ = child.start_kill();
    }
    let events = done1.saturating_sub(done0).max(1) as f64;
    Ok(RunnerCost {
        processes,
        per_second: events / elapsed.as_secs_f64(),
        busy: (busy1 - busy0) / elapsed.as_secs_f64() / cores(),
        client_ms: (client1 - client0) * 1e6 / events,
        server_ms: (server1 - server0) * 1e6 / events,
    })
}

/// Every measurement of the section.
pub(crate) async fn scaling_scenarios(server: &Server, size: &Size) -> Result<Scaling> {
    let mut commands = Vec::new();
    for clients in [1, 16] {
        commands.push(postgres_costs(server, size, clients).await?);
    }
    for partitions in [1, 2, 4] {
        commands.push(jetstream_costs(size, partitions).await?);
    }
    let (options, _) = server.fresh_db("scaling_runners").await?;
    let url = options.to_url_lossy().to_string();
    let store = PostgresStore::builder(pool(&options, 4, false).await?)
        .build()
        .await?;
    Balances::create_table(store.pool()).await?;
    let events = if size.quick { 300_000 } else { 1_000_000 };
    seed_events(store.pool(), events, events / 100).await?;
    let master = postmaster(store.pool()).await?;
    let mut runners = Vec::new();
    for processes in 1..=3 {
        runners.push(runner_costs(&url, &store, master, processes).await?);
    }
    Ok(Scaling {
        commands,
        runners,
        cores: cores(),
    })
}

/// The section of `docs/benchmarks.md`.
pub(crate) fn scaling_section(figures: &Scaling) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Costs per command and per event (the scaling model's inputs)\n\n\
         CPU per command of the client (the benchmark's process) and of each server \
         (`/proc/<pid>/stat`: the whole PostgreSQL server; each of the three nats-servers, \
         busiest first), deposits without the aggregate cache, on this machine of {:.0} \
         cores where clients and servers share the cores. `busy` is the share of the \
         machine's cores in use during the run; stored bytes are the events table's with its \
         indexes per event (PostgreSQL), a stream's bytes per message (JetStream, one \
         replica of three). The book's chapter *Scaling to many \
         machines* (`docs/src/scaling.md`) feeds its model with these figures.\n\n\
         | run | commands | cmd/s | busy | client ms/cmd | server ms/cmd | per server | WAL bytes/cmd | stored bytes/event |\n\
         |---|---:|---:|---:|---:|---:|---|---:|---:|",
        figures.cores
    );
    for c in &figures.commands {
        let per_server: Vec<String> = c.servers_ms.iter().map(|ms| format!("{ms:.3}")).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} % | {:.3} | {:.3} | {} | {} | {} |",
            c.label,
            c.commands,
            c.per_second,
            100.0 * c.busy,
            c.client_ms,
            c.server_ms(),
            per_server.join(" / "),
            c.wal_bytes.map_or("–".to_owned(), |b| format!("{b:.0}")),
            c.row_bytes.map_or("–".to_owned(), |b| format!("{b:.0}")),
        );
    }
    // The check: a CPU-bound run does what the machine's cores allow at the
    // cost measured with one partition.
    if let Some(base) = figures
        .commands
        .iter()
        .find(|c| c.label.starts_with("JetStream, 1 partition,"))
    {
        let per_command = base.client_ms + base.server_ms();
        let _ = writeln!(
            md,
            "\n**Checked against more partitions.** With one partition a command cost \
             {per_command:.3} ms of CPU in all; if the cores are the bound, {:.0} cores \
             allow {:.0} commands/s whatever the partitions on one machine.\n\n\
             | partitions | predicted cmd/s | measured cmd/s | measured / predicted | CPU ms/cmd measured |\n|---|---:|---:|---:|---:|",
            figures.cores,
            figures.cores * 1000.0 / per_command,
        );
        for c in figures
            .commands
            .iter()
            .filter(|c| c.label.starts_with("JetStream"))
        {
            let predicted = figures.cores * 1000.0 / per_command;
            let partitions = c.label.split_whitespace().nth(1).unwrap_or("?").to_owned();
            let _ = writeln!(
                md,
                "| {partitions} | {predicted:.0} | {:.0} | {:.2} | {:.3} |",
                c.per_second,
                c.per_second / predicted,
                c.client_ms + c.server_ms()
            );
        }
    }
    let _ = writeln!(
        md,
        "\nA projection (`Balances`, 4 partitions, batches of 2,000) catching up on a log of \
         seeded events with 1 to 3 runner processes, measured from the moment each process \
         owns its share until the first partition reaches the head; CPU per 1,000 events of \
         the runner processes and of the PostgreSQL server.\n\n\
         | runner processes | events/s | busy | runners' ms per 1,000 events | server ms per 1,000 events |\n|---:|---:|---:|---:|---:|"
    );
    for r in &figures.runners {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} % | {:.1} | {:.1} |",
            r.processes,
            r.per_second,
            100.0 * r.busy,
            r.client_ms,
            r.server_ms
        );
    }
    let _ = writeln!(md);
    md
}
