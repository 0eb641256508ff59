//! The JetStream scenarios: commands on one and several partitions, and
//! projections fed from JetStream into PostgreSQL.

use outflow::EventLog;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use example_accounts::projections::Balances;
use example_accounts::{BankAccount, BankEvent};
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::store::jetstream::JetStreamStore;
use outflow::{AppendRequest, CommandBus, EventStore, NewEvent, PostgresStore};

use crate::scenarios::*;
use crate::setup::*;
use crate::stats::*;

/// The nats-server version the cluster runs (from `OUTFLOW_NATS_BIN`).
pub(crate) fn nats_version() -> String {
    std::env::var("OUTFLOW_NATS_BIN")
        .ok()
        .and_then(|bin| {
            std::process::Command::new(bin)
                .arg("--version")
                .output()
                .ok()
        })
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "(unknown version)".to_owned())
}

/// A JetStream store of `partitions` on the 3-node cluster `scripts/bench.sh`
/// starts (`NATS_CLUSTER_URL`), replicas 3, under a prefix of its own.
pub(crate) async fn jetstream_store(label: &str, partitions: u32) -> Result<JetStreamStore> {
    let urls = std::env::var("NATS_CLUSTER_URL")
        .context("NATS_CLUSTER_URL is not set: run scripts/bench.sh, which starts a cluster")?;
    let client = async_nats::ConnectOptions::new()
        .connect(urls.split(',').map(str::to_owned).collect::<Vec<_>>())
        .await?;
    Ok(JetStreamStore::builder(client)
        .prefix(format!("bench_{label}_{}", std::process::id()))
        .partitions(partitions)
        .replicas(3)
        .build()
        .await?)
}

pub(crate) async fn jetstream_system(
    label: &str,
    partitions: u32,
    cache: usize,
) -> Result<(System, JetStreamStore)> {
    let store = jetstream_store(label, partitions).await?;
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .cache_aggregates(cache)
        .build();
    Ok((System::OutflowJetStream(Arc::new(bus)), store))
}

/// The JetStream scenarios: commands at 1 and 16 clients on 1 and 4
/// partitions, and a rebuild of `Balances` (read model in PostgreSQL) from
/// a seeded log, per partition count.
pub(crate) struct JetStreamResult {
    /// Partitions, clients, aggregate cache, the rate.
    pub(crate) commands: Vec<(u32, usize, bool, Rate)>,
    pub(crate) rebuilds: Vec<(u32, usize, f64)>,
}

pub(crate) async fn jetstream_scenarios(server: &Server, size: &Size) -> Result<JetStreamResult> {
    let mut commands_run = Vec::new();
    for cache in [false, true] {
        for partitions in [1u32, 4] {
            for clients in [1usize, 16] {
                let label = format!("c{clients}p{partitions}{}", if cache { "c" } else { "" });
                let (system, _) =
                    jetstream_system(&label, partitions, if cache { 100_000 } else { 0 }).await?;
                let rate = commands(&system, size.accounts, size.deposits, clients).await?;
                commands_run.push((partitions, clients, cache, rate));
            }
        }
    }
    let mut rebuilds = Vec::new();
    let events = size.rebuild_events / 2;
    for partitions in [1u32, 4] {
        let store = jetstream_store(&format!("rebuild{partitions}"), partitions).await?;
        seed_jetstream(&store, events, size.rebuild_accounts).await?;
        let (options, _) = server.fresh_db(&format!("js_rebuild{partitions}")).await?;
        let read_models = PostgresStore::builder(pool(&options, 8, false).await?)
            .build()
            .await?;
        Balances::create_table(read_models.pool()).await?;
        let heads = {
            let mut heads = Vec::new();
            for p in 0..partitions {
                heads.push(
                    store
                        .head_of(&outflow::LogFilter::all().with_partition(p, partitions))
                        .await?,
                );
            }
            heads
        };
        let log: Arc<dyn EventLog> = Arc::new(store.clone());
        let runner = ProjectionRunner::with_log(log, read_models.clone())
            .projection(ProjectionOptions::new(Balances::new()).batch_size(2_000))
            .build()?;
        let started = Instant::now();
        let (shutdown, running) = spawn_runner(&runner);
        for head in heads {
            runner
                .wait_for(head, &["account_balances"], Duration::from_secs(600))
                .await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        shutdown.cancel();
        let _ = running.await;
        rebuilds.push((partitions, events, events as f64 / seconds));
    }
    Ok(JetStreamResult {
        commands: commands_run,
        rebuilds,
    })
}

/// Writes `events` bank events over `accounts` accounts into a JetStream
/// store (100 events per append, 16 appends at a time).
pub(crate) async fn seed_jetstream(
    store: &JetStreamStore,
    events: usize,
    accounts: usize,
) -> Result<()> {
    let per_account = events / accounts;
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for a in (worker..accounts).step_by(16) {
                let id = format!("acc-{a:06}");
                let mut version = 0u64;
                while (version as usize) < per_account {
                    let n = (per_account - version as usize).min(100);
                    let events = (0..n)
                        .map(|i| {
                            let event = if version == 0 && i == 0 {
                                BankEvent::AccountOpened { owner: id.clone() }
                            } else {
                                BankEvent::Deposited { amount: 7 }
                            };
                            NewEvent::from_event::<BankAccount>(&id, &event)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    store
                        .append(AppendRequest {
                            aggregate_type: "account".into(),
                            aggregate_id: id.clone(),
                            expected_version: version,
                            events,
                        })
                        .await?;
                    version += n as u64;
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
