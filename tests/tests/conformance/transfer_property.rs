//! The transfer process under random interleavings: transfers that are
//! refused (too little money, a target that does not exist), deposits that
//! race them, and the process's runner aborted at random moments (a crash:
//! its tasks dropped mid-step, its transactions rolled back) and restarted.
//! Whatever the interleaving, on SQLite and PostgreSQL:
//!
//! - the sum of balances is the sum of deposits: no money is created or destroyed;
//! - each transfer ends in exactly one terminal state;
//! - a `failed` transfer moved no money;
//! - compensation happens exactly when the debit succeeded and the credit did not;
//! - each account event of a transfer happened at most once.
//!
//! Cases are seeded (`TRANSFER_PROPERTY_CASES` sets how many per backend,
//! default 3; the seed of a failing case is printed).

use outflow_tests as common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use example_accounts::transfer::{Transfer, TransferCommand, TransferEvent, TransferProcess};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::cqrs_es::Aggregate;
use outflow::process::Process;
use outflow::projection::{ProjectionOptions, RetryPolicy};
use outflow::runner::ProjectionRunner;
use outflow::view::ViewStore;
use outflow::{CommandBus, EventLog, EventStore, ProjectionStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const ACCOUNTS: usize = 4;

fn cases() -> u64 {
    std::env::var("TRANSFER_PROPERTY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// A fresh seed, or `TRANSFER_PROPERTY_SEED` to replay one.
fn seed() -> u64 {
    std::env::var("TRANSFER_PROPERTY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::random::<u32>() as u64)
}

struct Bank<S: EventStore> {
    accounts: Arc<CommandBus<BankAccount, S>>,
    transfers: Arc<CommandBus<Transfer, S>>,
}

fn runner<S>(store: &S, bank: &Bank<S>) -> ProjectionRunner<S>
where
    S: ViewStore + ProjectionStore + EventStore + EventLog + Clone + 'static,
{
    let process = Process::new(
        TransferProcess::new(bank.accounts.clone(), bank.transfers.clone()),
        store,
        "transfer_processes",
    )
    .expect("the process");
    ProjectionRunner::builder(store.clone())
        // The same node id after each crash: the restarted node takes its
        // own leases back at once.
        .node_id("transfer-property")
        .lease_ttl(Duration::from_secs(2))
        .heartbeat_interval(Duration::from_millis(200))
        .projection(ProjectionOptions::new(process).retry(RetryPolicy {
            max_attempts: 20,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(100),
        }))
        .build()
        .expect("the runner")
}

async fn one_case<S>(store: S, seed: u64)
where
    S: ViewStore + ProjectionStore + EventStore + EventLog + Clone + 'static,
{
    let mut rng = StdRng::seed_from_u64(seed);
    let bank = Bank {
        accounts: Arc::new(
            CommandBus::builder(store.clone(), ())
                .remember_typed_refusals()
                .build(),
        ),
        transfers: Arc::new(
            CommandBus::builder(store.clone(), ())
                .remember_typed_refusals()
                .build(),
        ),
    };
    let ids: Vec<String> = (0..ACCOUNTS).map(|i| format!("s{seed}-a{i}")).collect();
    let missing = format!("s{seed}-nobody");
    let mut deposited = 0i64;
    for id in &ids {
        bank.accounts
            .execute(id, BankCommand::Open { owner: id.clone() })
            .await
            .expect("open");
        let amount = rng.random_range(1..=300);
        bank.accounts
            .execute(id, BankCommand::Deposit { amount })
            .await
            .expect("deposit");
        deposited += amount;
    }
    runner(&store, &bank).setup().await.expect("setup");

    let mut transfers = Vec::new();
    let mut running: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
    for step in 0..40 {
        match rng.random_range(0..10) {
            0..=4 => {
                let from = ids[rng.random_range(0..ACCOUNTS)].clone();
                let to = if rng.random_bool(0.15) {
                    missing.clone()
                } else {
                    ids[rng.random_range(0..ACCOUNTS)].clone()
                };
                if from == to {
                    continue;
                }
                let id = format!("s{seed}-t{step}");
                let amount = rng.random_range(1..=250);
                bank.transfers
                    .execute(&id, TransferCommand::Request { from, to, amount })
                    .await
                    .expect("request a transfer");
                transfers.push(id);
            }
            5..=6 => {
                let account = ids[rng.random_range(0..ACCOUNTS)].clone();
                let amount = rng.random_range(1..=200);
                if let Err(error) = bank
                    .accounts
                    .execute_retrying(&account, 50, || BankCommand::Deposit { amount })
                    .await
                {
                    let loaded = bank.accounts.load(&account).await.map(|(_, v)| v);
                    let stream = store
                        .read_stream(BankAccount::TYPE, &account, 0, 1000)
                        .await
                        .map(|e| e.len());
                    let begin = outflow::Transactional::begin(&store).await.map(|_| ());
                    panic!("seed {seed}: a deposit failed: {error:?}; load says {loaded:?}, the stream has {stream:?}; begin: {begin:?}");
                }
                deposited += amount;
            }
            7..=8 => {
                if running.is_none() {
                    let runner = runner(&store, &bank);
                    let shutdown = CancellationToken::new();
                    let token = shutdown.clone();
                    let handle = tokio::spawn(async move {
                        let _ = runner.run(token).await;
                    });
                    running = Some((shutdown, handle));
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
            }
            _ => {
                // A crash: the runner's tasks are dropped wherever they are.
                if let Some((_, handle)) = running.take() {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..25))).await;
                    handle.abort();
                    let _ = handle.await;
                }
            }
        }
    }
    if let Some((_, handle)) = running.take() {
        handle.abort();
        let _ = handle.await;
    }

    // A last runner finishes every transfer.
    let last = runner(&store, &bank);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let handle = tokio::spawn(async move { last.run(token).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for id in &transfers {
        loop {
            let (transfer, _) = bank.transfers.load(id).await.expect("load a transfer");
            if transfer.ended {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let status = runner(&store, &bank).status().await;
                let dead = store.dead_letters("transfer_process").await;
                panic!(
                    "seed {seed}: transfer {id} did not end: {transfer:?}\n{status:#?}\n{dead:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    shutdown.cancel();
    handle
        .await
        .expect("the runner task")
        .expect("the runner stopped cleanly");

    // Every account event, by transfer.
    let mut total = 0;
    let mut moves: HashMap<String, Vec<&'static str>> = HashMap::new();
    for id in &ids {
        let (account, _) = bank.accounts.load(id).await.expect("load an account");
        assert!(account.balance >= 0, "seed {seed}: {id} overdrawn");
        total += account.balance;
        for event in store
            .read_stream(BankAccount::TYPE, id, 0, usize::MAX)
            .await
            .expect("read an account")
        {
            let payload = event
                .decode_payload::<BankAccount>()
                .expect("an account event");
            let (transfer, kind) = match payload {
                BankEvent::TransferredOut { transfer_id, .. } => (transfer_id, "out"),
                BankEvent::TransferredIn { transfer_id, .. } => (transfer_id, "in"),
                BankEvent::Refunded { transfer_id, .. } => (transfer_id, "refund"),
                _ => continue,
            };
            moves.entry(transfer).or_default().push(kind);
        }
    }
    assert_eq!(total, deposited, "seed {seed}: money created or destroyed");
    for id in &transfers {
        let mut ends = Vec::new();
        for event in store
            .read_stream(Transfer::TYPE, id, 0, usize::MAX)
            .await
            .expect("read a transfer")
        {
            match event
                .decode_payload::<Transfer>()
                .expect("a transfer event")
            {
                TransferEvent::TransferFailed { .. } => ends.push("failed"),
                TransferEvent::TransferCompleted => ends.push("completed"),
                TransferEvent::TransferCompensated => ends.push("compensated"),
                _ => {}
            }
        }
        let mut moved = moves.remove(id).unwrap_or_default();
        moved.sort_unstable();
        let expected: &[&str] = match ends.as_slice() {
            ["failed"] => &[],
            ["completed"] => &["in", "out"],
            ["compensated"] => &["out", "refund"],
            other => panic!("seed {seed}: transfer {id} ended {other:?}"),
        };
        assert_eq!(moved, expected, "seed {seed}: transfer {id} ended {ends:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_crashes_on_sqlite() {
    for case in 0..cases() {
        let seed = seed();
        eprintln!("case {case}: seed {seed}");
        let dir = common::TestDir::new(&format!("transfer_property_{seed}"));
        one_case(dir.sqlite().await, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_crashes_on_postgres() {
    for case in 0..cases() {
        let seed = seed();
        eprintln!("case {case}: seed {seed}");
        let db = common::TestDb::new(&format!("transfer_property_{case}")).await;
        one_case(db.store().await, seed).await;
    }
}
