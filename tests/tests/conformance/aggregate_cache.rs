//! The command bus's aggregate cache: commands on cached aggregates skip the
//! load, a stale cached aggregate is caught by the append's concurrency check,
//! and a rejected command never leaves a half-applied aggregate behind.

use outflow_tests as common;

use example_accounts::{BankAccount, BankCommand, BankError};
use outflow::{CommandBus, CommandError, MemoryStore, PostgresStore};

async fn cached_bus_behaves<S: outflow::Backend>(store: S) {
    let cached = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .cache_aggregates(2)
        .build();
    let other = CommandBus::<BankAccount, _>::new(store.clone(), ());

    cached
        .execute(
            "a",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await
        .expect("open");
    for _ in 0..5 {
        cached
            .execute("a", BankCommand::Deposit { amount: 10 })
            .await
            .expect("deposit");
    }
    // A rejected command: the aggregate it ran on is dropped, not cached.
    match cached
        .execute("a", BankCommand::Withdraw { amount: 1_000 })
        .await
    {
        Err(CommandError::Rejected(BankError::InsufficientFunds { balance, .. })) => {
            assert_eq!(balance, 50)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let done = cached
        .execute("a", BankCommand::Withdraw { amount: 20 })
        .await
        .expect("withdraw");
    assert_eq!(done.version, 7);

    // Another writer moves the aggregate: the cached copy is stale, the
    // append catches it, and a retry loads the fresh state.
    other
        .execute("a", BankCommand::Deposit { amount: 100 })
        .await
        .expect("other writer");
    let stale = cached
        .execute("a", BankCommand::Deposit { amount: 1 })
        .await;
    assert!(
        matches!(&stale, Err(e) if e.is_conflict()),
        "a stale cached aggregate must conflict, got {stale:?}"
    );
    let retried = cached
        .execute_retrying("a", 3, || BankCommand::Withdraw { amount: 130 })
        .await
        .expect("the retry sees the other writer's deposit");
    assert_eq!(retried.version, 9);
    let (account, version) = other.load("a").await.expect("load");
    assert_eq!((account.balance, version), (0, 9));

    // The cache is bounded: three aggregates through a cache of two.
    for id in ["b", "c", "d"] {
        cached
            .execute(id, BankCommand::Open { owner: id.into() })
            .await
            .expect("open");
    }
    for id in ["b", "c", "d", "a"] {
        cached
            .execute(id, BankCommand::Deposit { amount: 5 })
            .await
            .expect("deposit after eviction");
    }
    let (account, _) = other.load("a").await.expect("load");
    assert_eq!(account.balance, 5);
}

#[tokio::test]
async fn memory_store() {
    cached_bus_behaves(MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store() {
    let db = common::TestDb::new("cache").await;
    let store: PostgresStore = db.store().await;
    cached_bus_behaves(store).await;
}
