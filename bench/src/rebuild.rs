//! Rebuilds, each in a child process so that its peak memory is its own.

use outflow::EventLog;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cqrs_es::persist::{GenericQuery, QueryReplay};
use example_accounts::projections::{Balances, SqliteBalances};
use example_accounts::BankAccount;
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::view::ViewProjection;
use outflow::{PostgresStore, SqliteStore};
use postgres_es::{PostgresEventRepository, PostgresViewRepository};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;

use crate::scenarios::*;
use crate::setup::*;
use crate::stats::*;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RebuildReport {
    pub(crate) events: u64,
    pub(crate) seconds: f64,
    pub(crate) peak_rss_mb: f64,
}

/// The batch sizes the rebuilds run with: a projection's default-sized
/// catch-up batches (2,000) and large ones (10,000).
pub(crate) const REBUILD_BATCHES: [usize; 2] = [2_000, 10_000];

/// In a child process: replays the whole log into one projection and reports.
pub(crate) async fn rebuild_child(url: &str, kind: &str, batch: usize) -> Result<()> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        return rebuild_child_sqlite(path, batch).await;
    }
    let options: PgConnectOptions = url.parse()?;
    let store = PostgresStore::builder(pool(&options, 4, false).await?)
        .build()
        .await?;
    let options = match kind {
        "batch" => {
            // Each run replays into an empty table.
            Balances::create_table(store.pool()).await?;
            sqlx::query("TRUNCATE account_balances")
                .execute(store.pool())
                .await?;
            ProjectionOptions::new(Balances::named(format!("rebuild_batch_{batch}")))
                .batch_size(batch)
        }
        "view" => {
            let name = format!("rebuild_view_{batch}");
            let view = ViewProjection::<BankAccount, BalanceView>::new(&name, &name)?;
            view.create_table(store.pool()).await?;
            ProjectionOptions::new(view).batch_size(batch)
        }
        other => bail!("unknown rebuild kind `{other}`"),
    };
    let runner = ProjectionRunner::builder(store.clone())
        .projection(options)
        .build()?;
    let head = store.head().await?;
    let started = Instant::now();
    let (shutdown, handle) = spawn_runner(&runner);
    let name = format!("rebuild_{kind}_{batch}");
    runner
        .wait_for(head, &[name.as_str()], Duration::from_secs(1800))
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let events = runner.status().await?.iter().map(|s| s.processed).sum();
    shutdown.cancel();
    handle.await?;
    let report = RebuildReport {
        events,
        seconds,
        peak_rss_mb: peak_rss_mb(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// In a child process: replays a SQLite file's log into `SqliteBalances`.
pub(crate) async fn rebuild_child_sqlite(path: &str, batch: usize) -> Result<()> {
    let store = SqliteStore::open(path).await?;
    let runner = ProjectionRunner::builder(store.clone())
        .projection(
            ProjectionOptions::new(SqliteBalances::named("rebuild_batch")).batch_size(batch),
        )
        .build()?;
    let head = store.head().await?;
    let started = Instant::now();
    let (shutdown, handle) = spawn_runner(&runner);
    runner
        .wait_for(head, &["rebuild_batch"], Duration::from_secs(1800))
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let events = runner.status().await?.iter().map(|s| s.processed).sum();
    shutdown.cancel();
    handle.await?;
    let report = RebuildReport {
        events,
        seconds,
        peak_rss_mb: peak_rss_mb(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

pub(crate) async fn run_rebuild_child(
    url: &str,
    kind: &str,
    batch: usize,
) -> Result<RebuildReport> {
    let exe = std::env::current_exe()?;
    let output = tokio::process::Command::new(exe)
        .args(["rebuild-child", url, kind, &batch.to_string()])
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "rebuild child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .last()
        .context("no report from the rebuild child")?;
    Ok(serde_json::from_str(line)?)
}

pub(crate) struct RebuildResult {
    /// By batch size.
    pub(crate) batch: Vec<(usize, RebuildReport)>,
    pub(crate) sqlite_batch: RebuildReport,
    pub(crate) view: Vec<(usize, RebuildReport)>,
    pub(crate) replay_events: usize,
    pub(crate) replay_per_second: f64,
}

pub(crate) async fn rebuilds(server: &Server, size: &Size) -> Result<RebuildResult> {
    let (options, _) = server.fresh_db("rebuild").await?;
    let url = options.to_url_lossy().to_string();
    {
        let store = PostgresStore::builder(pool(&options, 4, false).await?)
            .build()
            .await?;
        seed_events(store.pool(), size.rebuild_events, size.rebuild_accounts).await?;
    }
    let mut batch = Vec::new();
    let mut view = Vec::new();
    for size in REBUILD_BATCHES {
        batch.push((size, run_rebuild_child(&url, "batch", size).await?));
        view.push((size, run_rebuild_child(&url, "view", size).await?));
    }
    let dir = sqlite_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("rebuild.db");
    seed_sqlite(&path, size.rebuild_events, size.rebuild_accounts).await?;
    let sqlite_batch =
        run_rebuild_child(&format!("sqlite:{}", path.display()), "batch", 2_000).await?;

    let (options, _) = server.fresh_db("replay_pges").await?;
    let pges_pool = pool(&options, 4, true).await?;
    postgres_es_schema(&pges_pool).await?;
    seed_events(&pges_pool, size.replay_events, size.replay_events / 100).await?;
    let repo = Arc::new(PostgresViewRepository::<BalanceView, BankAccount>::new(
        "balance_view",
        pges_pool.clone(),
    ));
    let replay = QueryReplay::new(
        PostgresEventRepository::new(pges_pool.clone()),
        GenericQuery::new(repo),
    );
    let started = Instant::now();
    replay
        .replay_all()
        .await
        .map_err(|e| anyhow::anyhow!("postgres-es replay failed: {e}"))?;
    let replay_per_second = size.replay_events as f64 / started.elapsed().as_secs_f64();
    Ok(RebuildResult {
        batch,
        sqlite_batch,
        view,
        replay_events: size.replay_events,
        replay_per_second,
    })
}
