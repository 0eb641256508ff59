//! Failures that used to be silent, each forced on purpose: stored rows
//! that PostgreSQL accepts but `serde_json` refuses, a transaction held open
//! while later appends commit, a slow side effect, the state right after a
//! batch; and the first-week API around them (setup hook, view queries with
//! read-your-writes, `cqrs-es` queries, metadata, errors that print once).

use outflow_tests as common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_es::{EventEnvelope, Query};
use example_accounts::projections::AccountView;
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::error::error_chain;
use outflow::projection::{
    HandlerError, OnError, Projection, ProjectionOptions, QueryProjection, RetryPolicy,
};
use outflow::runner::{ProjectionRunner, WaitError};
use outflow::store::ProjectionState;
use outflow::view::ViewProjection;
use outflow::{
    AppendRequest, CommandBus, CommandError, EventStore, LogFilter, NewEvent, PostgresStore,
    RecordedEvent, StoreError,
};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

mod bad_rows;
mod held_and_slow;
mod live_state;

const QUICK_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 2,
    initial_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(50),
};

/// Writes the position of every `wallet` event it handles into
/// `seen_<name>`, a table its setup hook creates.
struct Seen {
    name: &'static str,
}

impl Seen {
    fn table(&self) -> String {
        format!("seen_{}", self.name)
    }
}

#[async_trait]
impl Projection<PostgresStore> for Seen {
    fn name(&self) -> &str {
        self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["wallet"])
    }

    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (position bigint PRIMARY KEY, wallet text NOT NULL)",
            self.table()
        ))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            sqlx::query(&format!(
                "INSERT INTO {} (position, wallet) VALUES ($1, $2)",
                self.table()
            ))
            .bind(i64::try_from(event.position)?)
            .bind(&event.aggregate_id)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(&format!("DELETE FROM {}", self.table()))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn seen(store: &PostgresStore, name: &str) -> Vec<u64> {
    sqlx::query_scalar::<_, i64>(&format!(
        "SELECT position FROM seen_{name} ORDER BY position"
    ))
    .fetch_all(store.pool())
    .await
    .unwrap_or_default()
    .into_iter()
    .map(|p| p as u64)
    .collect()
}

/// Appends one event (one command) to `aggregate`.
async fn credit(
    store: &PostgresStore,
    aggregate_type: &str,
    aggregate: &str,
    version: u64,
) -> RecordedEvent {
    let mut events = store
        .append(AppendRequest {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate.into(),
            expected_version: version,
            events: vec![NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "Credited".into(),
                event_version: "1".into(),
                payload: json!({ "amount": version + 1 }),
                metadata: Default::default(),
                correlation_id: None,
                causation_id: None,
            }],
        })
        .await
        .expect("append");
    events.pop().expect("one event")
}

fn runner_builder(
    store: &PostgresStore,
) -> outflow::runner::ProjectionRunnerBuilder<PostgresStore> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
}

/// The four kinds of stored JSON that PostgreSQL's `json` accepts and
/// `serde_json` refuses: (column, SQL text of the value).
fn corruptions() -> Vec<(&'static str, &'static str, String)> {
    vec![
        (
            "lone surrogate",
            "payload",
            r#"{"amount": 1, "note": "\ud800"}"#.to_owned(),
        ),
        (
            "number out of range",
            "payload",
            r#"{"amount": 1e400}"#.to_owned(),
        ),
        (
            "nesting 200 deep",
            "payload",
            format!(
                r#"{{"amount": 1, "deep": {}{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
        ),
        (
            "metadata of the wrong shape",
            "metadata",
            r#"{"user": 7}"#.to_owned(),
        ),
    ]
}

async fn corrupt(store: &PostgresStore, column: &str, value: &str, position: u64) {
    let updated = sqlx::query(&format!(
        "UPDATE {} SET {column} = $1::json WHERE position = $2",
        store.events_table()
    ))
    .bind(value)
    .bind(position as i64)
    .execute(store.pool())
    .await
    .expect("corrupt a row");
    assert_eq!(updated.rows_affected(), 1);
}
