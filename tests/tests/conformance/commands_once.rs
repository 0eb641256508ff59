//! `CommandBus::execute_once` on every backend: a command sent again with
//! the same command id — one after the other or racing — is written once,
//! and every sender gets the events of that one write.

use outflow_tests as common;
use outflow_tests::on_every_backend;

use std::sync::Arc;

use example_accounts::{BankAccount, BankCommand, BankError};
use outflow::{CommandBus, CommandContext, CommandError, EventStore};

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

/// A refused command keeps its refusal: re-sent after the aggregate
/// changed (it would now be accepted), one after the other and from eight
/// senders at once, with and without typed refusals; pruned outcomes make
/// it a new command.
async fn remembers_refusals<S: EventStore + Clone + 'static>(store: S) {
    let plain = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    let typed = Arc::new(
        CommandBus::<BankAccount, _>::builder(store.clone(), ())
            .remember_typed_refusals()
            .build(),
    );
    plain
        .execute(
            "r",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await
        .expect("open");

    let context = CommandContext::new();
    let first = typed
        .execute_once("r", BankCommand::Withdraw { amount: 100 }, context.clone())
        .await;
    let refusal = BankError::InsufficientFunds {
        balance: 0,
        requested: 100,
    };
    match &first {
        Err(CommandError::Rejected(error)) => assert_eq!(error, &refusal),
        other => panic!("not refused: {other:?}"),
    }
    plain
        .execute("r", BankCommand::Deposit { amount: 500 })
        .await
        .expect("deposit");
    // Typed: the same error value again, though the balance now allows it.
    match typed
        .execute_once("r", BankCommand::Withdraw { amount: 100 }, context.clone())
        .await
    {
        Err(CommandError::Rejected(error)) => assert_eq!(error, refusal),
        other => panic!("the refusal was not remembered: {other:?}"),
    }
    // Untyped: the refusal as stored, with its message and version.
    match plain
        .execute_once("r", BankCommand::Withdraw { amount: 100 }, context.clone())
        .await
    {
        Err(CommandError::Refused(stored)) => {
            assert_eq!(stored.message, refusal.to_string());
            assert_eq!(stored.version, 1);
            assert_eq!(stored.command_id, context.command_id);
            assert_eq!(stored.error::<BankError>(), Some(refusal.clone()));
        }
        other => panic!("the refusal was not remembered: {other:?}"),
    }
    let (account, version) = plain.load("r").await.expect("load");
    assert_eq!(
        (account.balance, version),
        (500, 2),
        "nothing was withdrawn"
    );

    // Eight senders of one refused command at once: one refusal for all.
    let racing = CommandContext::new();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let bus = plain.clone();
        let context = racing.clone();
        tasks.push(tokio::spawn(async move {
            bus.execute_once("r", BankCommand::Withdraw { amount: 900 }, context)
                .await
        }));
    }
    let mut messages = Vec::new();
    for task in tasks {
        let result = task.await.expect("the task");
        let error = result.expect_err("refused");
        assert!(error.is_refusal(), "{error:?}");
        messages.push(error.refusal_message().expect("a message"));
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "every sender got the same refusal");
    plain
        .execute("r", BankCommand::Deposit { amount: 1_000 })
        .await
        .expect("deposit");
    let again = plain
        .execute_once("r", BankCommand::Withdraw { amount: 900 }, racing.clone())
        .await
        .expect_err("still refused");
    assert_eq!(again.refusal_message(), Some(messages[0].clone()));
    assert_eq!(plain.load("r").await.expect("load").0.balance, 1_500);

    // Pruned: the command is new again and, the balance allowing it, runs.
    let pruned = store
        .prune_outcomes(chrono::Utc::now() + chrono::Duration::seconds(1))
        .await
        .expect("prune");
    assert!(pruned >= 2, "pruned {pruned}");
    let done = plain
        .execute_once("r", BankCommand::Withdraw { amount: 900 }, racing)
        .await
        .expect("a new command after pruning");
    assert!(!done.repeated);
    assert_eq!(plain.load("r").await.expect("load").0.balance, 600);
}

/// Senders of one command id decide differently when a deposit lands
/// between their loads (some see too little money, some enough): every
/// sender still gets one and the same outcome, and the balance agrees.
async fn one_outcome_when_senders_disagree<S: EventStore + Clone + 'static>(store: S) {
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    for round in 0..12 {
        let account = format!("d{round}");
        bus.execute(&account, BankCommand::Open { owner: "Bo".into() })
            .await
            .expect("open");
        bus.execute(&account, BankCommand::Deposit { amount: 500 })
            .await
            .expect("deposit");
        let context = CommandContext::new();
        let mut tasks = Vec::new();
        for sender in 0..8 {
            let bus = bus.clone();
            let context = context.clone();
            let account = account.clone();
            tasks.push(tokio::spawn(async move {
                if sender == 4 {
                    // The deposit that changes the decision, racing the senders.
                    bus.execute_retrying(&account, 20, || BankCommand::Deposit { amount: 200 })
                        .await
                        .expect("the racing deposit");
                }
                loop {
                    match bus
                        .execute_once(
                            &account,
                            BankCommand::Withdraw { amount: 600 },
                            context.clone(),
                        )
                        .await
                    {
                        Ok(done) => return Ok(done.events[0].event_id),
                        Err(error) if error.is_conflict() => continue,
                        Err(error) if error.is_refusal() => {
                            return Err(error.refusal_message().expect("a message"))
                        }
                        Err(error) => panic!("sender failed: {error}"),
                    }
                }
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("the task"));
        }
        outcomes.dedup();
        assert_eq!(outcomes.len(), 1, "round {round}: {outcomes:?}");
        let (balance, _) = bus.load(&account).await.expect("load");
        match &outcomes[0] {
            Ok(_) => assert_eq!(balance.balance, 100, "round {round}: withdrawn once"),
            Err(_) => assert_eq!(balance.balance, 700, "round {round}: nothing withdrawn"),
        }
    }
}

on_every_backend! {
    remembers_refusals: refusals_on_memory, refusals_on_postgres, refusals_on_sqlite;
    one_outcome_when_senders_disagree: disagreeing_on_memory, disagreeing_on_postgres, disagreeing_on_sqlite;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_on_jetstream() {
    remembers_refusals(common::jetstream_store(&common::nats_url(), "refusals", 1).await).await;
}
