//! Events from one backend, read model and checkpoints in another: the
//! runner reads the log of an in-memory store and commits each batch's
//! read-model writes with its checkpoint in PostgreSQL, and `wait_for` and
//! `status` work across the two.

use outflow_tests as common;

use std::sync::Arc;
use std::time::Duration;

use example_accounts::projections::{BalanceRow, Balances};
use example_accounts::{BankAccount, BankEvent};
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::store::ProjectionState;
use outflow::{AppendRequest, Checkpoint, EventLog, EventStore, MemoryStore, NewEvent};

/// Appends `events` to account `id` (at `version`) in the memory store.
async fn append(log: &MemoryStore, id: &str, version: u64, events: &[BankEvent]) -> Checkpoint {
    let written = log
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: id.into(),
            expected_version: version,
            events: events
                .iter()
                .map(|event| NewEvent::from_event::<BankAccount>(id, event).expect("serialize"))
                .collect(),
        })
        .await
        .expect("append to the memory store");
    written.last().expect("events written").checkpoint()
}

fn history(account: usize) -> Vec<BankEvent> {
    let mut events = vec![BankEvent::AccountOpened {
        owner: format!("owner-{account}"),
    }];
    for i in 0..9 {
        events.push(if (i + account).is_multiple_of(3) {
            BankEvent::Withdrawn { amount: 2 }
        } else {
            BankEvent::Deposited {
                amount: (i + 1) as i64 * 10,
            }
        });
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_from_memory_read_model_in_postgres() {
    let db = common::TestDb::new("split_backends").await;
    let read_models = db.store().await;
    Balances::create_table(read_models.pool())
        .await
        .expect("create account_balances");
    let events = MemoryStore::new();

    // A backlog before the runner starts...
    let mut last = Checkpoint::START;
    for account in 0..5 {
        last = append(&events, &format!("acc-{account}"), 0, &history(account)).await;
    }
    let log: Arc<dyn EventLog> = Arc::new(events.clone());
    let runner = ProjectionRunner::with_log(log, read_models.clone())
        .projection(ProjectionOptions::new(Balances::new()).batch_size(7))
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(2))
        .build()
        .expect("runner");
    let (shutdown, running) = common::start_runner(&runner);
    runner
        .wait_for(last, &["account_balances"], Duration::from_secs(30))
        .await
        .expect("the backlog reaches PostgreSQL");

    // ...and events appended while it tails the memory store's log.
    let more = [BankEvent::Deposited { amount: 1000 }];
    let tail = append(&events, "acc-2", 10, &more).await;
    runner
        .wait_for(tail, &["account_balances"], Duration::from_secs(10))
        .await
        .expect("a live append reaches PostgreSQL");

    let mut expected = Vec::new();
    for account in 0..5 {
        let mut history = history(account);
        if account == 2 {
            history.extend(more.clone());
        }
        let mut row = BalanceRow::default();
        Balances::fold(&history, &format!("acc-{account}"), &mut row);
        expected.push(row);
    }
    let rows = Balances::rows(read_models.pool())
        .await
        .expect("read the balances");
    assert_eq!(
        rows, expected,
        "the read model is the fold of the memory log"
    );

    let status = common::status_of(&runner, "account_balances").await;
    assert_eq!(
        status.checkpoint, tail,
        "the checkpoint is the memory log's"
    );
    assert_eq!(status.lag_events, 0);
    assert_eq!(status.state, ProjectionState::Live);
    assert_eq!(status.processed, 51);
    common::stop_runner(shutdown, running).await;
}
