//! A small banking session on SQLite — one file, `accounts.db`, in the
//! working directory — showing the pieces of Outflow working together: the
//! command bus, an asynchronous projection whose table lives in the same
//! file, read-your-writes, post-commit pub/sub, and the global log. No set-up
//! needed: `cargo run -p example-accounts`. Each run opens two new accounts
//! and keeps everything the earlier runs wrote.

use std::time::Duration;

use anyhow::Context;
use example_accounts::projections::SqliteBalances;
use example_accounts::{BankAccount, BankCommand};
use futures::TryStreamExt as _;
use outflow::prelude::*;
use outflow::projection::ProjectionOptions;
use outflow::pubsub::EventBus;
use outflow::runner::ProjectionRunner;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let file = "accounts.db";
    let store = SqliteStore::open(file)
        .await
        .with_context(|| format!("opening {file}"))?;
    let notifications = EventBus::new(64);
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .snapshot_every(10)
        .publish_to(notifications.clone())
        .build();

    // The projection runs in the background, as it would in a service; its
    // table `account_balances` lives in the same file.
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(SqliteBalances::new()))
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

    // New accounts each run: the file keeps the earlier ones.
    let run = &uuid::Uuid::now_v7().simple().to_string()[24..];
    let ann = format!("ann-{run}");
    let bob = format!("bob-{run}");
    let session = [
        (
            ann.as_str(),
            BankCommand::Open {
                owner: "Ann".into(),
            },
        ),
        (
            bob.as_str(),
            BankCommand::Open {
                owner: "Bob".into(),
            },
        ),
        (ann.as_str(), BankCommand::Deposit { amount: 12_000 }),
        (bob.as_str(), BankCommand::Deposit { amount: 3_500 }),
        (ann.as_str(), BankCommand::Withdraw { amount: 2_000 }),
        (bob.as_str(), BankCommand::Withdraw { amount: 9_000 }),
        (bob.as_str(), BankCommand::Withdraw { amount: 3_500 }),
        (bob.as_str(), BankCommand::Close),
    ];
    let first = store.head().await?;
    let mut last = first;
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
        .wait_for(last, &["account_balances"], Duration::from_secs(5))
        .await?;
    let rows = SqliteBalances::rows(store.readers()).await?;
    println!(
        "\nThe balances projection in {file} (caught up with position {}, {} accounts):",
        last.position,
        rows.len()
    );
    for row in rows.iter().rev().take(6).rev() {
        println!(
            "  {}: {} cents, owner {}{}",
            row.account_id,
            row.balance,
            row.owner,
            if row.closed { ", closed" } else { "" }
        );
    }
    for status in runner.status().await? {
        println!(
            "  status: {} partition {} is {:?}, {} events processed, lag {}",
            status.projection, status.partition, status.state, status.processed, status.lag_events
        );
    }

    println!("\nThe global log, this run's part:");
    let mut log = outflow::log::read_log(&store, first, LogFilter::all(), 100);
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
    for account in [&ann, &bob] {
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
    store.close().await;
    println!("Everything is kept in {file}; run again to add to it.");
    Ok(())
}
