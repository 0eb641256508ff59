//! `EventLog::committed_head` is the last committed event even while an open
//! transaction keeps log readers (and `head`) before it — what a strong read
//! waits for — and `ProjectionRunner::setup` creates read-model tables
//! before the runner starts.

use outflow_tests as common;

use std::time::Duration;

use example_accounts::{BankAccount, BankCommand};
use outflow::prelude::*;
use outflow::sqlx;
use outflow::view::ViewProjection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_head_passes_an_open_transaction_on_postgres() {
    let db = common::TestDb::new("committed_head").await;
    let store = db.store().await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let first = bus
        .execute(
            "a",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await
        .expect("open")
        .checkpoint()
        .expect("a checkpoint");
    common::eventually("the first event readable", Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            let head = store.head().await.expect("head");
            if head == first {
                Ok(())
            } else {
                Err(format!("head at {head:?}"))
            }
        }
    })
    .await;

    // A transaction that holds a transaction id, opened before the deposit.
    let mut holder = store.pool().begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await
        .expect("take a transaction id");
    let second = bus
        .execute("a", BankCommand::Deposit { amount: 5 })
        .await
        .expect("deposit")
        .checkpoint()
        .expect("a checkpoint");
    assert_eq!(
        store.head().await.expect("head"),
        first,
        "readers are held back"
    );
    assert_eq!(
        store.committed_head().await.expect("committed head"),
        second
    );

    // A wait for the committed head does not return while the holder is open.
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(
            ViewProjection::<BankAccount, Balance>::new("balances_view", "balances_view")
                .expect("a view"),
        ))
        .build()
        .expect("a runner");
    let (shutdown, handle) = common::start_runner(&runner);
    let held = runner
        .wait_for(second, &["balances_view"], Duration::from_millis(500))
        .await;
    assert!(matches!(held, Err(WaitError::Timeout { .. })), "{held:?}");
    holder.rollback().await.expect("end the holder");
    runner
        .wait_for(second, &["balances_view"], Duration::from_secs(30))
        .await
        .expect("caught up once the holder ended");
    common::stop_runner(shutdown, handle).await;
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Balance {
    balance: i64,
}

impl View<BankAccount> for Balance {
    fn update(&mut self, event: &EventEnvelope<BankAccount>) {
        self.balance += event.payload.balance_change();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_head_is_the_head_on_sqlite() {
    let dir = common::TestDir::new("committed_head");
    let store = dir.sqlite().await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let done = bus
        .execute(
            "a",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await
        .expect("open")
        .checkpoint()
        .expect("a checkpoint");
    assert_eq!(store.committed_head().await.expect("committed"), done);
    assert_eq!(store.head().await.expect("head"), done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_creates_the_view_tables_before_the_runner_starts() {
    let dir = common::TestDir::new("runner_setup");
    let store = dir.sqlite().await;
    let view = ViewProjection::<BankAccount, Balance>::new("balances_view", "balances_view")
        .expect("a view");
    let query = view.query(&store);
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(view))
        .build()
        .expect("a runner");
    assert!(query.load("a").await.is_err(), "no table before setup");
    runner.setup().await.expect("setup");
    runner.setup().await.expect("setup is idempotent");
    assert_eq!(
        query
            .load("a")
            .await
            .expect("the table exists")
            .map(|b| b.balance),
        None
    );
    assert!(query.list(None, 10).await.expect("list").is_empty());
    // Registered too: status lists the projection before the runner starts.
    let status = runner.status().await.expect("status");
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0].projection, "balances_view");
}
