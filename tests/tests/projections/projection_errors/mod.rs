//! Failing projection handlers on PostgreSQL: a poison event is retried,
//! found by splitting its batch, parked with its error and skipped, and can be
//! retried or discarded later; `OnError::Stop` stops only that projection,
//! visibly, until it is restarted, and it then resumes at the failing event;
//! failures of the infrastructure are retried without limit and never park.

use outflow_tests as common;

use outflow::EventLog;
use outflow::{ErrorKind, Transactional};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::projection::{HandlerError, OnError, Projection, ProjectionOptions, RetryPolicy};
use outflow::runner::{ProjectionRunner, RetryError, WaitError};
use outflow::store::projections::ProjectionState;
use outflow::{Checkpoint, CommandBus, LogFilter, PostgresStore, RecordedEvent};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

mod poison;
mod transient;

/// The deposit amount the broken ledger refuses.
const POISON: i64 = 666;

const FAST_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    initial_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(50),
};

const WAIT: Duration = Duration::from_secs(60);

/// The ledger's refusal: an error with a cause, so its chain has two links.
#[derive(Debug)]
struct Refused {
    amount: i64,
    source: std::io::Error,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ledger refused the deposit of {}", self.amount)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

const REFUSAL: &str = "ledger refused the deposit of 666: ledger is broken";

/// Writes one row per event into its own table, in the runner's transaction;
/// refuses deposits of [`POISON`] while `broken` is set. Counts the calls per
/// event.
struct Ledger {
    name: String,
    table: String,
    broken: Arc<AtomicBool>,
    calls: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Ledger {
    fn new(name: &str, table: &str) -> Ledger {
        Ledger {
            name: name.to_owned(),
            table: table.to_owned(),
            broken: Arc::new(AtomicBool::new(true)),
            calls: Arc::default(),
        }
    }
}

fn calls_of(calls: &Mutex<HashMap<Uuid, usize>>, event_id: Uuid) -> usize {
    calls
        .lock()
        .expect("calls lock")
        .get(&event_id)
        .copied()
        .unwrap_or(0)
}

fn amount_of(event: &BankEvent) -> i64 {
    event.balance_change()
}

async fn insert_row(
    table: &str,
    event: &RecordedEvent,
    amount: i64,
    tx: &mut Transaction<'static, Postgres>,
) -> Result<(), HandlerError> {
    sqlx::query(&format!(
        "INSERT INTO {table} (event_id, aggregate_id, sequence, position, amount) \
         VALUES ($1, $2, $3, $4, $5)"
    ))
    .bind(event.event_id)
    .bind(&event.aggregate_id)
    .bind(i64::try_from(event.sequence)?)
    .bind(i64::try_from(event.position)?)
    .bind(amount)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Projection<PostgresStore> for Ledger {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            *self
                .calls
                .lock()
                .map_err(|_| HandlerError::msg("calls lock poisoned"))?
                .entry(event.event_id)
                .or_default() += 1;
            let envelope = event.clone().decode::<BankAccount>(&[])?;
            let amount = amount_of(&envelope.payload);
            if amount == POISON && self.broken.load(Ordering::SeqCst) {
                return Err(Refused {
                    amount,
                    source: std::io::Error::other("ledger is broken"),
                }
                .into());
            }
            insert_row(&self.table, event, amount, tx).await?;
        }
        Ok(())
    }
}

/// No unique key on purpose: an event applied twice shows up twice.
async fn create_ledger_table(pool: &PgPool, table: &str) {
    sqlx::query(&format!(
        "CREATE TABLE {table} (event_id uuid NOT NULL, aggregate_id text NOT NULL, \
         sequence bigint NOT NULL, position bigint NOT NULL, amount bigint NOT NULL)"
    ))
    .execute(pool)
    .await
    .expect("create the ledger table");
}

/// The event ids in a ledger table, in log order, duplicates included.
async fn ledger_ids(pool: &PgPool, table: &str) -> Vec<Uuid> {
    sqlx::query_scalar(&format!(
        "SELECT event_id FROM {table} ORDER BY position, event_id"
    ))
    .fetch_all(pool)
    .await
    .expect("read the ledger table")
}

/// What a command wrote, as the test remembers it.
#[derive(Debug, Clone)]
struct Written {
    event_id: Uuid,
    checkpoint: Checkpoint,
    aggregate_id: String,
    sequence: u64,
    position: u64,
    amount: i64,
}

impl Written {
    fn is_poison(&self) -> bool {
        self.amount == POISON
    }
}

async fn execute(
    bus: &CommandBus<BankAccount, PostgresStore>,
    written: &mut Vec<Written>,
    id: &str,
    command: BankCommand,
) {
    let committed = bus.execute(id, command).await.expect("the command runs");
    for event in &committed.events {
        written.push(Written {
            event_id: event.event_id,
            checkpoint: event.checkpoint(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            position: event.position,
            amount: amount_of(&event.payload),
        });
    }
}

/// The checkpoint of the last event written: a target for `wait_for`. (The
/// store's head can stay behind it while any transaction on the server is
/// open.)
fn last(written: &[Written]) -> Checkpoint {
    written.last().expect("events were written").checkpoint
}

fn ids(written: &[Written]) -> Vec<Uuid> {
    written.iter().map(|w| w.event_id).collect()
}

fn runner_builder(
    store: &PostgresStore,
) -> outflow::runner::ProjectionRunnerBuilder<PostgresStore> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
}
