//! A small banking session on the in-memory store, showing the
//! pieces of Outflow working together: the command bus, an asynchronous
//! projection kept by the runner, read-your-writes, post-commit pub/sub, and
//! the global log. No set-up needed: `cargo run -p example-accounts`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use example_accounts::{BankAccount, BankCommand, BankEvent};
use futures::TryStreamExt as _;
use outflow::prelude::*;
use outflow::projection::{typed, EventHandler, HandlerError, ProjectionOptions};
use outflow::pubsub::EventBus;
use outflow::runner::ProjectionRunner;
use outflow::store::memory::MemoryTransaction;
use tokio_util::sync::CancellationToken;

/// A read model: every account's balance, kept in memory by a projection.
#[derive(Default, Clone)]
struct Balances(Arc<Mutex<BTreeMap<String, i64>>>);

#[async_trait]
impl EventHandler<BankAccount, MemoryStore> for Balances {
    fn name(&self) -> &str {
        "balances"
    }

    async fn handle(
        &self,
        event: &Envelope<BankAccount>,
        _tx: &mut MemoryTransaction,
    ) -> Result<(), HandlerError> {
        let mut balances = self.0.lock().map_err(|_| HandlerError::msg("poisoned"))?;
        let balance = balances.entry(event.aggregate_id.clone()).or_default();
        match event.payload {
            BankEvent::Deposited { amount } => *balance += amount,
            BankEvent::Withdrawn { amount } => *balance -= amount,
            BankEvent::AccountOpened { .. } | BankEvent::AccountClosed => {}
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = MemoryStore::new();
    let notifications = EventBus::new(64);
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .snapshot_every(10)
        .publish_to(notifications.clone())
        .build();

    // The projection runs in the background, as it would in a service.
    let balances = Balances::default();
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(typed::<BankAccount, _, _>(
            balances.clone(),
        )))
        .build()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let runner = runner.clone();
        let shutdown = shutdown.clone();
        async move { runner.run(shutdown).await }
    });

    // A subscriber that may miss events (at most once), e.g. a live UI.
    let mut subscription = notifications.subscribe();
    let listener = tokio::spawn(async move {
        let mut seen = 0;
        while let Ok(event) = subscription.recv().await {
            seen += 1;
            if event.event_type == "AccountClosed" {
                println!("  [notification] account {} was closed", event.aggregate_id);
            }
        }
        seen
    });

    let session = [
        (
            "acc-ann",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        ),
        (
            "acc-bob",
            BankCommand::Open {
                owner: "Bob".into(),
            },
        ),
        ("acc-ann", BankCommand::Deposit { amount: 12_000 }),
        ("acc-bob", BankCommand::Deposit { amount: 3_500 }),
        ("acc-ann", BankCommand::Withdraw { amount: 2_000 }),
        ("acc-bob", BankCommand::Withdraw { amount: 9_000 }),
        ("acc-bob", BankCommand::Withdraw { amount: 3_500 }),
        ("acc-bob", BankCommand::Close),
    ];
    let mut last = Checkpoint::START;
    for (account, command) in session {
        let label = format!("{command:?} on {account}");
        match bus.execute(account, command).await {
            Ok(done) => {
                for event in &done.events {
                    println!(
                        "{label:<40} -> {} #{} at position {}",
                        event.event_type, event.sequence, event.position
                    );
                }
                last = done.checkpoint().unwrap_or(last);
            }
            Err(CommandError::Rejected(reason)) => println!("{label:<40} -> refused: {reason}"),
            Err(other) => return Err(other).context(label),
        }
    }

    // Read-your-writes: wait until the projection has seen the last command.
    runner
        .wait_for(last, &["balances"], Duration::from_secs(5))
        .await?;
    println!(
        "\nThe balances projection (caught up with position {}):",
        last.position
    );
    for (account, balance) in balances
        .0
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        println!("  {account}: {balance} cents");
    }
    for status in runner.status().await? {
        println!(
            "  status: {} partition {} is {:?}, {} events processed, lag {}",
            status.projection, status.partition, status.state, status.processed, status.lag_events
        );
    }

    println!("\nThe global log:");
    let mut log = outflow::log::read_log(&store, Checkpoint::START, LogFilter::all(), 100);
    while let Some(event) = log.try_next().await? {
        println!(
            "  {:>3}  {:<8} {:<10} {:<14} {}",
            event.position,
            event.aggregate_type,
            event.aggregate_id,
            event.event_type,
            event.payload
        );
    }

    println!("\nAggregates, loaded from their events:");
    for account in ["acc-ann", "acc-bob"] {
        let (state, version) = bus.load(account).await?;
        println!(
            "  {account}: {} cents, owner {}, version {version}{}",
            state.balance,
            state.owner,
            if state.closed { ", closed" } else { "" }
        );
    }

    shutdown.cancel();
    running.await??;
    drop(bus);
    drop(notifications);
    let seen = listener.await?;
    println!("\nThe subscriber saw {seen} events after their commits.");
    Ok(())
}
