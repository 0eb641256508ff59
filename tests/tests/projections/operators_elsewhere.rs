//! Operators act from another process: a rebuild, a pause and a resume
//! made by a second application instance (the CLI, another node) while a
//! first one runs the projections reach the owner within a heartbeat, the
//! unit is worked again without a restart, and the rebuild's progress
//! reaches its total — on PostgreSQL and on SQLite (two stores on one file).

use outflow_tests as common;

use std::time::Duration;

use example_accounts::app::{self, App, AppStore};
use example_accounts::BankCommand;
use outflow::store::projections::ProjectionState;

async fn rebuild_from_elsewhere<S: AppStore>(serving: S, operator: S) {
    let server = App::new(serving).await.expect("the serving app");
    let (shutdown, running) = common::start_runner(&server.runner);
    for i in 0..20 {
        let id = format!("acc-{i}");
        server
            .accounts
            .execute(
                &id,
                BankCommand::Open {
                    owner: format!("Owner {i}"),
                },
            )
            .await
            .expect("open");
        server
            .accounts
            .execute(&id, BankCommand::Deposit { amount: 10 + i })
            .await
            .expect("deposit");
    }
    let head = server.store.committed_head().await.expect("head");
    server
        .runner
        .wait_for(head, &[app::BALANCES], Duration::from_secs(30))
        .await
        .expect("caught up before the rebuild");

    // The operator's process: its own instance, whose runner runs while it
    // rebuilds, as the example's CLI does (a second node joins, takes its
    // share, and leaves).
    let operator = App::new(operator).await.expect("the operator's app");
    let (operator_stop, operator_running) = common::start_runner(&operator.runner);
    for round in 0..3 {
        let mut progress = operator
            .runner
            .rebuild(app::BALANCES)
            .await
            .expect("start a rebuild");
        let total = progress.borrow().total;
        tokio::time::timeout(Duration::from_secs(30), async {
            while !progress.borrow().is_complete() {
                progress.changed().await.expect("progress");
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "round {round}: the rebuild did not finish: {:?} of {total}",
                *progress.borrow()
            )
        });
        server
            .runner
            .wait_for(head, &[app::BALANCES], Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: the server's wait after the rebuild: {e}"));
        let rows = server.balances.list(None, 100).await.expect("balances");
        assert_eq!(rows.len(), 20, "round {round}: the read model is complete");
    }
    common::stop_runner(operator_stop, operator_running).await;
    // The operator's node left: the server works every unit again at once.
    server
        .accounts
        .execute("acc-1", BankCommand::Deposit { amount: 5 })
        .await
        .expect("deposit after the operator left");
    let after = server.store.committed_head().await.expect("head");
    server
        .runner
        .wait_for(after, &app::PROJECTIONS, Duration::from_secs(5))
        .await
        .expect("every projection caught up after the operator left");

    // Pause and resume from the operator's process reach the owner within
    // a heartbeat: its worker says so in the status.
    operator.runner.pause(app::BALANCES).await.expect("pause");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The state the worker recorded (status shows `paused` as soon as
        // the flag is set).
        let statuses = server
            .store
            .units(Some(app::BALANCES))
            .await
            .expect("units");
        if statuses.iter().all(|s| s.state == ProjectionState::Paused) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the owner did not pause: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
        .accounts
        .execute("acc-0", BankCommand::Deposit { amount: 1 })
        .await
        .expect("deposit while paused");
    let paused_head = server.store.committed_head().await.expect("head");
    assert!(
        server
            .runner
            .wait_for(paused_head, &[app::BALANCES], Duration::from_secs(2))
            .await
            .is_err(),
        "a paused projection moved"
    );
    operator.runner.resume(app::BALANCES).await.expect("resume");
    server
        .runner
        .wait_for(paused_head, &[app::BALANCES], Duration::from_secs(30))
        .await
        .expect("resumed from elsewhere");
    let acc0 = server
        .balances
        .load("acc-0")
        .await
        .expect("load")
        .expect("acc-0");
    assert_eq!(acc0.balance, 11);

    common::stop_runner(shutdown, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_from_elsewhere_on_postgres() {
    let db = common::TestDb::new("operators_elsewhere").await;
    rebuild_from_elsewhere(db.store().await, db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_from_elsewhere_on_sqlite() {
    let dir = common::TestDir::new("operators_elsewhere");
    rebuild_from_elsewhere(dir.sqlite().await, dir.sqlite().await).await;
}
