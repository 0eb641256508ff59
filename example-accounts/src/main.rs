//! Runs a small banking session on an embedded store and prints the global
//! log and the resulting balances. No set-up needed: `cargo run -p example-accounts`.

use anyhow::Context;
use example_accounts::{BankAccount, BankCommand};
use futures::TryStreamExt as _;
use outflow::prelude::*;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = MemoryStore::new();
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .snapshot_every(10)
        .build();

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
            }
            Err(CommandError::Rejected(reason)) => println!("{label:<40} -> refused: {reason}"),
            Err(other) => return Err(other).context(label),
        }
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

    println!("\nBalances:");
    for account in ["acc-ann", "acc-bob"] {
        let (state, version) = bus.load(account).await?;
        println!(
            "  {account}: {} cents, owner {}, version {version}{}",
            state.balance,
            state.owner,
            if state.closed { ", closed" } else { "" }
        );
    }
    Ok(())
}
