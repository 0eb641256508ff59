//! Operating projections: a rebuild reports its progress (receiver and
//! status) and ends with the same read model; pause holds a projection and
//! resume lets it go on; a killed `LISTEN` connection neither stops the runner
//! nor stays dead; an inbox makes an outside effect happen once per event
//! across redelivery (and shows it is at least once); and the in-memory
//! backend runs projections like PostgreSQL does.

use outflow_tests as common;

use outflow::store::{Checkpoints, Inbox};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use example_accounts::projections::{BalanceRow, Balances};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::doc_fixture::{Counter, CounterCommand, CounterEvent};
use outflow::projection::{
    typed, EventHandler, HandlerError, OnError, Projection, ProjectionOptions, RetryPolicy,
};
use outflow::runner::{ProjectionRunner, RebuildProgress, WaitError};
use outflow::store::memory::MemoryTransaction;
use outflow::store::projections::ProjectionState;
use outflow::{
    AppendRequest, Checkpoint, CommandBus, Envelope, EventStore, LogFilter, MemoryStore, NewEvent,
    PostgresStore, RecordedEvent,
};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

mod connections_and_inbox;
mod memory_store;
mod rebuild_and_pause;
mod reset_to;

const WAIT: Duration = Duration::from_secs(60);

const FAST_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    initial_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(50),
};

fn runner_builder<S: outflow::Backend>(store: &S) -> outflow::runner::ProjectionRunnerBuilder<S> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
}

/// Waits until the store's head (what log readers may read up to) has
/// passed `target`: an open transaction anywhere on the server holds it back
/// for a moment.
async fn head_reaches<S: outflow::EventLog>(store: &S, target: Checkpoint) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.head().await.expect("head") < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the head never reached {target}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn balance_of(pool: &PgPool, account: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT balance FROM account_balances WHERE account_id = $1")
        .bind(account)
        .fetch_optional(pool)
        .await
        .expect("read a balance")
}
