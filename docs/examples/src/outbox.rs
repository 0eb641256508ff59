//! The transactional outbox chapter (`docs/src/outbox.md`), on PostgreSQL:
//! a user row and its message in one transaction, and a relay delivering to
//! an in-process sink. `tests/outbox.rs` runs it against the server of the
//! test suite.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outflow::{CancellationToken, HandlerError, PostgresStore, StoreError};

// ANCHOR: enqueue
use outflow::outbox::{Outbox, OutboxMessage};
use outflow::sqlx;
use serde_json::json;

/// Saves a user and the message announcing it: both commit, or neither.
pub async fn sign_up(
    store: &PostgresStore,
    outbox: &Outbox,
    id: i64,
    email: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut tx = store.pool().begin().await?;
    sqlx::query("INSERT INTO users (id, email) VALUES ($1, $2)")
        .bind(id)
        .bind(email)
        .execute(&mut *tx)
        .await?;
    let message_id = outbox
        .enqueue(
            &mut tx,
            OutboxMessage::new(format!("user-{id}"), "users.signed_up", json!({ "id": id }))
                .header("content-type", "application/json"),
        )
        .await?;
    outbox.commit(tx).await?; // commits, then wakes the relay
    Ok(message_id.to_string())
}
// ANCHOR_END: enqueue

// ANCHOR: relay
use outflow::outbox::{InProcessSink, OutboxMessageRecord};

/// Delivers every committed message to `delivered` (a mailer, a broker…),
/// at least once and in order per key, until `shutdown`.
pub async fn deliver(
    outbox: &Outbox,
    delivered: Arc<Mutex<Vec<String>>>,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let sink = InProcessSink::new(move |batch: Vec<OutboxMessageRecord>| {
        let delivered = delivered.clone();
        async move {
            let mut delivered = delivered
                .lock()
                .map_err(|_| HandlerError::new("the delivered list is poisoned"))?;
            for message in &batch {
                // Deduplicate by `message.message_id`: a batch may come again.
                delivered.push(format!("{} {}", message.topic, message.payload));
            }
            Ok::<(), HandlerError>(())
        }
    });
    let relay = outbox
        .relay(sink)
        .batch_size(100) // messages per sink call
        .retention(Duration::from_secs(7 * 24 * 3600)) // the default
        .build()?;
    relay.run(shutdown).await
}
// ANCHOR_END: relay
