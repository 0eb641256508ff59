//! Failover: how long a projection stays without an owner after its node is
//! SIGKILLed (found gone by its presence lock) or silenced with SIGSTOP (its
//! lease has to run out). Each node is a child process running `Balances`
//! with the runner's default lease and heartbeat.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use example_accounts::projections::Balances;
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::store::Checkpoints;
use outflow::PostgresStore;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::setup::*;
use crate::stats::*;

const PROJECTION: &str = "account_balances";

/// Takeover times, in the order measured.
pub(crate) struct Failover {
    /// After a SIGKILL of the owner.
    pub(crate) killed: Vec<Duration>,
    /// After a SIGSTOP of the owner (connections open, node silent).
    pub(crate) silent: Vec<Duration>,
    /// The runner's default lease and heartbeat the nodes ran with.
    pub(crate) lease: Duration,
    pub(crate) heartbeat: Duration,
}

/// In a child process: runs `Balances` as node `node` with the runner's
/// defaults until killed, or until its standard input closes.
pub(crate) async fn failover_child(url: &str, node: &str) -> Result<()> {
    let options: PgConnectOptions = url.parse()?;
    let store = PostgresStore::builder(pool(&options, 4, false).await?)
        .build()
        .await?;
    let runner = ProjectionRunner::builder(store)
        .node_id(node)
        .projection(ProjectionOptions::new(Balances::new()))
        .build()?;
    let shutdown = CancellationToken::new();
    cancel_when_stdin_closes(&shutdown);
    let result = runner.run(shutdown).await;
    Ok(result?)
}

struct Node {
    child: Child,
    name: String,
}

impl Node {
    fn spawn(url: &str, name: String) -> Result<Node> {
        let child = Command::new(std::env::current_exe()?)
            .args(["failover-child", url, &name])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a failover node")?;
        Ok(Node { child, name })
    }

    /// Sends `signal` by this process's own PID.
    async fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.child.id().context("the node has exited")?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    async fn kill(mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// Waits until `node` owns the projection under a valid lease; returns how
/// long that took. Polls every 5 ms.
async fn owned_by(store: &PostgresStore, node: &str, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let units = store.units(Some(PROJECTION)).await?;
        if units
            .iter()
            .any(|u| u.lease_valid && u.owner.as_deref() == Some(node))
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("{node} did not take the projection within {within:?}: {units:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `node` has beaten at least once.
async fn beating(store: &PostgresStore, node: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let seen: Option<bool> =
            sqlx::query_scalar("SELECT presence IS NOT NULL FROM events_nodes WHERE node = $1")
                .bind(node)
                .fetch_optional(store.pool())
                .await?;
        if seen == Some(true) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{node} never beat with its presence lock");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `kills` takeovers after SIGKILL, then `silences` after SIGSTOP.
pub(crate) async fn failover_scenarios(server: &Server, size: &Size) -> Result<Failover> {
    let (kills, silences): (u32, u32) = if size.quick { (5, 1) } else { (20, 3) };
    let (options, name) = server.fresh_db("failover").await?;
    let store = PostgresStore::builder(pool(&options, 4, false).await?)
        .build()
        .await?;
    Balances::create_table(store.pool()).await?;
    let url = options.to_url_lossy().to_string();
    let url = if url.contains(&name) {
        url
    } else {
        bail!("cannot build the failover database's URL")
    };
    let defaults = ProjectionRunner::builder(store.clone()).build()?;
    let (lease, heartbeat) = (defaults.lease_ttl(), defaults.heartbeat_interval());
    drop(defaults);
    let mut counter = 0;
    let mut next_name = || {
        counter += 1;
        format!("failover-{}-{counter}", std::process::id())
    };
    let mut owner = Node::spawn(&url, next_name())?;
    owned_by(&store, &owner.name, Duration::from_secs(60)).await?;
    let mut killed = Vec::new();
    for round in 0..kills {
        let standby = Node::spawn(&url, next_name())?;
        beating(&store, &standby.name).await?;
        // Kill at a spread of phases of the standby's heartbeat: right after
        // its beat is the worst case, just before it the best.
        tokio::time::sleep(heartbeat.mul_f64(f64::from(round) / f64::from(kills))).await;
        let started = Instant::now();
        owner.kill().await?;
        owned_by(&store, &standby.name, Duration::from_secs(60)).await?;
        killed.push(started.elapsed());
        owner = standby;
    }
    let mut silent = Vec::new();
    for _ in 0..silences {
        let standby = Node::spawn(&url, next_name())?;
        beating(&store, &standby.name).await?;
        let started = Instant::now();
        owner.signal("-STOP").await?;
        owned_by(&store, &standby.name, Duration::from_secs(60)).await?;
        silent.push(started.elapsed());
        owner.kill().await?;
        owner = standby;
    }
    owner.kill().await?;
    Ok(Failover {
        killed,
        silent,
        lease,
        heartbeat,
    })
}

/// The p50 and the largest of `times`, in seconds.
pub(crate) fn median_and_max(times: &[Duration]) -> (f64, f64) {
    let mut seconds: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    seconds.sort_by(f64::total_cmp);
    let p50 = seconds.get(seconds.len() / 2).copied().unwrap_or(0.0);
    let max = seconds.last().copied().unwrap_or(0.0);
    (p50, max)
}

/// The section of `docs/benchmarks.md`.
pub(crate) fn failover_section(figures: &Failover) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Failover\n\n\
         Two runner processes on one projection with the runner's defaults (lease {:.0} s, \
         heartbeat {:.0} s): the owner is stopped, and the time is taken from the signal \
         until the other process holds the projection under a valid lease (polled every \
         5 ms). After a SIGKILL the owner's sessions end with it, and with them the \
         presence lock it recorded: the standby claims at its next heartbeat. The kills fall at evenly spread phases of the standby's heartbeat. After a \
         SIGSTOP (a node that is only silent, as in a network partition: its connections \
         and its lock stay open) the standby has to wait for the lease to run out.\n\n\
         | how the owner stopped | takeovers | p50 s | max s |\n|---|---|---|---|",
        figures.lease.as_secs_f64(),
        figures.heartbeat.as_secs_f64()
    );
    for (label, times) in [
        ("SIGKILL", &figures.killed),
        ("SIGSTOP (silent)", &figures.silent),
    ] {
        let (p50, max) = median_and_max(times);
        let _ = writeln!(md, "| {label} | {} | {p50:.2} | {max:.2} |", times.len());
    }
    let _ = writeln!(md);
    md
}
