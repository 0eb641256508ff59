//! A projection catches up with a large log and then follows it live; its
//! read model equals a direct fold of the same events, and `wait_for` gives
//! read-your-writes.

use outflow_tests as common;

use std::collections::BTreeMap;
use std::time::Duration;

use example_accounts::projections::{BalanceRow, Balances};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::projection::ProjectionOptions;
use outflow::runner::{ProjectionRunner, WaitError};
use outflow::{AppendRequest, CommandBus, EventStore, NewEvent};

const ACCOUNTS: usize = 50;
const EVENTS: usize = 100_000;
const PER_APPEND: usize = 50;

fn events_for(account: usize, round: usize) -> Vec<BankEvent> {
    (0..PER_APPEND)
        .map(|i| {
            if round == 0 && i == 0 {
                BankEvent::AccountOpened {
                    owner: format!("owner-{account}"),
                }
            } else if matches!((i + account) % 7, 0) {
                BankEvent::Withdrawn { amount: 3 }
            } else {
                BankEvent::Deposited {
                    amount: (i % 13 + 1) as i64,
                }
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catch_up_of_100k_events_equals_a_direct_fold() {
    let db = common::TestDb::new("catchup").await;
    let store = db.store().await;
    Balances::create_table(store.pool()).await.expect("table");

    // 100,000 events over 50 accounts, written by 5 concurrent writers.
    let mut expected: BTreeMap<String, BalanceRow> = BTreeMap::new();
    let rounds = EVENTS / PER_APPEND / ACCOUNTS;
    for account in 0..ACCOUNTS {
        let id = format!("acc-{account:02}");
        let row = expected.entry(id.clone()).or_default();
        for round in 0..rounds {
            Balances::fold(&events_for(account, round), &id, row);
        }
    }
    let mut writers = Vec::new();
    for writer in 0..5 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut last = outflow::Checkpoint::START;
            for round in 0..rounds {
                for account in (writer..ACCOUNTS).step_by(5) {
                    let events = events_for(account, round)
                        .iter()
                        .map(|e| NewEvent::from_event::<BankAccount>("x", e).expect("serialize"))
                        .collect();
                    let written = store
                        .append(AppendRequest {
                            aggregate_type: "account".into(),
                            aggregate_id: format!("acc-{account:02}"),
                            expected_version: (round * PER_APPEND) as u64,
                            events,
                        })
                        .await
                        .expect("append");
                    last = last.max(written.last().expect("written").checkpoint());
                }
            }
            last
        }));
    }
    // The target is the last event written, not the log's head: a
    // transaction open elsewhere on the server can hold the head back.
    let mut head = outflow::Checkpoint::START;
    for writer in writers {
        head = head.max(writer.await.expect("writer"));
    }

    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(Balances::new()).batch_size(1000))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);

    // The status can be read while it catches up.
    let mut saw_progress = false;
    for _ in 0..200 {
        let status = runner.status().await.expect("status");
        assert!(status.len() <= 1);
        if status
            .first()
            .is_some_and(|s| s.processed > 0 && s.lag_events > 0)
        {
            assert_eq!(status[0].owner.as_deref(), Some(runner.node_id()));
            saw_progress = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    runner
        .wait_for(head, &["account_balances"], Duration::from_secs(120))
        .await
        .expect("caught up");
    let rows = Balances::rows(store.pool()).await.expect("rows");
    assert_eq!(rows, expected.values().cloned().collect::<Vec<_>>());
    let status = runner.status().await.expect("status");
    assert_eq!(status[0].lag_events, 0);
    assert_eq!(status[0].processed, EVENTS as u64);
    assert!(
        saw_progress,
        "status was never read mid-way (catch-up too fast to observe?)"
    );

    // Live: a command's effect is visible once wait_for returns.
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let done = bus
        .execute("acc-00", BankCommand::Deposit { amount: 1_000_000 })
        .await
        .expect("deposit");
    runner
        .wait_for(
            done.checkpoint().expect("wrote"),
            &["account_balances"],
            Duration::from_secs(30),
        )
        .await
        .expect("read your writes");
    let rows = Balances::rows(store.pool()).await.expect("rows");
    assert_eq!(rows[0].balance, expected["acc-00"].balance + 1_000_000);

    shutdown.cancel();
    handle.await.expect("runner stops");
    let status = runner.status().await.expect("status");
    assert_eq!(
        status[0].owner, None,
        "the lease was given back on shutdown"
    );

    // Without a runner, wait_for times out with a typed error.
    let done = bus
        .execute("acc-01", BankCommand::Deposit { amount: 1 })
        .await
        .expect("deposit");
    match runner
        .wait_for(
            done.checkpoint().expect("wrote"),
            &["account_balances"],
            Duration::from_millis(300),
        )
        .await
    {
        Err(WaitError::Timeout { projection, .. }) => assert_eq!(projection, "account_balances"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    match runner
        .wait_for(head, &["nope"], Duration::from_millis(10))
        .await
    {
        Err(WaitError::UnknownProjection(name)) => assert_eq!(name, "nope"),
        other => panic!("expected UnknownProjection, got {other:?}"),
    }
}
