//! `CommandBus::execute_once` on every backend: a command sent again with
//! the same command id — one after the other or racing — is written once,
//! and every sender gets the events of that one write.

mod common;

use std::sync::Arc;

use example_accounts::{BankAccount, BankCommand};
use outflow::{CommandBus, CommandContext, EventStore};

async fn runs_a_command_once_per_id<S: EventStore + Clone + 'static>(store: S) {
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    bus.execute(
        "acc",
        BankCommand::Open {
            owner: "Ann".into(),
        },
    )
    .await
    .expect("open");

    // The same command id twice in a row: one deposit.
    let context = CommandContext::new();
    let first = bus
        .execute_once("acc", BankCommand::Deposit { amount: 10 }, context.clone())
        .await
        .expect("first");
    let again = bus
        .execute_once("acc", BankCommand::Deposit { amount: 10 }, context.clone())
        .await
        .expect("again");
    assert!(!first.repeated && again.repeated);
    assert_eq!(first.events.len(), 1);
    assert_eq!(again.events[0].event_id, first.events[0].event_id);
    assert_eq!(again.events[0].position, first.events[0].position);
    assert_eq!(again.version, 2);
    // A command that would now be refused is still recognized as done.
    let repeat_refusable = bus
        .execute_once("acc", BankCommand::Withdraw { amount: 1_000 }, context)
        .await
        .expect("a repeated command is not run again");
    assert!(repeat_refusable.repeated);

    // Eight senders race with one command id: one write, all succeed.
    let racing = CommandContext::new();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let bus = bus.clone();
        let context = racing.clone();
        tasks.push(tokio::spawn(async move {
            bus.execute_once("acc", BankCommand::Deposit { amount: 5 }, context)
                .await
        }));
    }
    let mut written = 0;
    let mut ids = Vec::new();
    for task in tasks {
        let done = task
            .await
            .expect("the task")
            .expect("every sender succeeds");
        if !done.repeated {
            written += 1;
        }
        ids.push(done.events[0].event_id);
    }
    assert_eq!(written, 1, "exactly one sender wrote");
    ids.dedup();
    assert_eq!(ids.len(), 1, "every sender got the same event");

    // Different ids, derived or fresh, are different commands.
    let follow = racing.follow_up("next");
    assert_eq!(follow.command_id, racing.follow_up("next").command_id);
    assert_ne!(follow.command_id, racing.command_id);
    bus.execute_once("acc", BankCommand::Deposit { amount: 1 }, follow)
        .await
        .expect("a follow-up");
    let (account, version) = bus.load("acc").await.expect("load");
    assert_eq!((account.balance, version), (16, 4));
}

on_every_backend! {
    runs_a_command_once_per_id: once_on_memory, once_on_postgres, once_on_sqlite;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_on_jetstream() {
    runs_a_command_once_per_id(common::jetstream_store(&common::nats_url(), "once", 1).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_on_a_jetstream_cluster() {
    runs_a_command_once_per_id(
        common::jetstream_store(&common::nats_cluster_url(), "once", 2).await,
    )
    .await;
}
