//! The JetStream event store with read models in SQL: commands from
//! concurrent writers into 4 partition streams, projected into PostgreSQL
//! and SQLite exactly once (compared with a fold of each aggregate's
//! stream), with `wait_for`, status, lag, a restart, a rebuild and a parked
//! poison message working as on the other backends; and a publish whose
//! acknowledgement is lost on the wire, retried without a second copy.
//!
//! Needs `NATS_URL` (scripts/test.sh starts the server) and `DATABASE_URL`.

use outflow_tests as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use example_accounts::projections::{BalanceRow, Balances, SqliteBalances};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::projection::ProjectionOptions;
use outflow::runner::{ProjectionRunner, WaitError};
use outflow::store::jetstream::JetStreamStore;
use outflow::store::ProjectionState;
use outflow::{AppendRequest, Checkpoint, CommandBus, EventLog, EventStore, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod appends;
mod nodes;
mod projections;

const WRITERS: usize = 8;
const ACCOUNTS_PER_WRITER: usize = 5;

/// Every account's events, as the store has them, folded into rows.
async fn fold_of(store: &JetStreamStore, accounts: &[String]) -> Vec<BalanceRow> {
    let mut rows = Vec::new();
    for id in accounts {
        let events: Vec<BankEvent> = store
            .read_stream("account", id, 0, usize::MAX)
            .await
            .expect("read an account's stream")
            .iter()
            .map(|e| e.decode_payload::<BankAccount>().expect("decode"))
            .collect();
        let mut row = BalanceRow::default();
        Balances::fold(&events, id, &mut row);
        rows.push(row);
    }
    rows.sort_by(|a, b| a.account_id.cmp(&b.account_id));
    rows
}

/// `WRITERS` tasks, each opening its accounts and moving money on them,
/// all also depositing on one shared account (retrying on conflicts).
/// Returns the accounts and the checkpoint of every command.
async fn write(
    bus: &Arc<CommandBus<BankAccount, JetStreamStore>>,
    round: usize,
) -> (Vec<String>, Vec<Checkpoint>) {
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut checkpoints = Vec::new();
            let mut accounts = Vec::new();
            for k in 0..ACCOUNTS_PER_WRITER {
                let id = format!("acc-{writer}-{k}");
                if round == 0 {
                    let opened = bus
                        .execute(
                            &id,
                            BankCommand::Open {
                                owner: format!("owner {writer}"),
                            },
                        )
                        .await
                        .expect("open");
                    checkpoints.push(opened.checkpoint().expect("written"));
                }
                for amount in [100, 250] {
                    let done = bus
                        .execute(
                            &id,
                            BankCommand::Deposit {
                                amount: amount + round as i64,
                            },
                        )
                        .await
                        .expect("deposit");
                    checkpoints.push(done.checkpoint().expect("written"));
                }
                let done = bus
                    .execute(&id, BankCommand::Withdraw { amount: 30 })
                    .await
                    .expect("withdraw");
                checkpoints.push(done.checkpoint().expect("written"));
                accounts.push(id);
            }
            // Every writer on one account: conflicts, retried.
            loop {
                match bus
                    .execute("shared", BankCommand::Deposit { amount: 1 })
                    .await
                {
                    Ok(done) => {
                        checkpoints.push(done.checkpoint().expect("written"));
                        break;
                    }
                    Err(error) if error.is_conflict() => continue,
                    Err(error) => panic!("shared deposit: {error}"),
                }
            }
            (accounts, checkpoints)
        }));
    }
    let mut accounts = vec!["shared".to_owned()];
    let mut checkpoints = Vec::new();
    for task in tasks {
        let (a, c) = task.await.expect("a writer panicked");
        accounts.extend(a);
        checkpoints.extend(c);
    }
    accounts.sort();
    (accounts, checkpoints)
}

/// A runner reading `log` into `read_models`, with a short heartbeat and
/// lease so tests do not wait for units to be claimed.
fn fast_runner<S: outflow::ProjectionStore>(
    log: Arc<dyn EventLog>,
    read_models: &S,
    projection: ProjectionOptions<S>,
) -> ProjectionRunner<S> {
    ProjectionRunner::with_log(log, read_models.clone())
        .projection(projection)
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(2))
        .build()
        .expect("runner")
}

async fn open_shared(bus: &CommandBus<BankAccount, JetStreamStore>) {
    bus.execute(
        "shared",
        BankCommand::Open {
            owner: "all".into(),
        },
    )
    .await
    .expect("open the shared account");
}
