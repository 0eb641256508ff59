//! Dead letters of broker messages in PostgreSQL (the table migration 4
//! creates next to the events table: `<events table>_dead_messages`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::{Postgres, Row, Transaction};

use super::errors::pg_error;
use super::PostgresStore;
use crate::error::StoreError;
use crate::names::Identifier;
use crate::port::messages::{DeadMessage, DeadMessageStore, ReceivedMessage};

/// The [`DeadMessageStore`] for [`PostgresStore`]: one row per parked message
/// in `<events table>_dead_messages` (created by the store's migrations),
/// written in the transaction that claims the message in the inbox.
///
/// The inbox claim stays when a dead letter is listed or discarded: a later
/// delivery of the same message id is skipped. Handle a parked message by
/// your own means (its payload and headers are kept), then
/// [`discard`](Self::discard) it.
#[derive(Debug, Clone)]
pub struct PostgresDeadMessages {
    table: String,
    insert: String,
    list: String,
    discard: String,
}

impl Default for PostgresDeadMessages {
    /// For the default events table, `events`.
    fn default() -> Self {
        Self::with_table("\"events_dead_messages\"")
    }
}

impl PostgresDeadMessages {
    /// For a store whose events table is `events_table` (as given to
    /// [`PostgresStoreBuilder::events_table`](crate::PostgresStoreBuilder::events_table);
    /// `events` by default).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] for an invalid table name.
    pub fn new(events_table: &str) -> Result<Self, StoreError> {
        let table = Identifier::parse(events_table, "events table")?
            .derived("dead_messages", "dead messages table")?
            .quoted();
        Ok(Self::with_table(&table))
    }

    fn with_table(table: &str) -> Self {
        PostgresDeadMessages {
            table: table.to_owned(),
            insert: format!(
                "INSERT INTO {table} (consumer, message_id, stream, stream_sequence, subject, \
                 headers, payload, deliveries, error) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (consumer, message_id) DO NOTHING"
            ),
            list: format!(
                "SELECT id, consumer, message_id, stream, stream_sequence, subject, headers, \
                 payload, deliveries, error, parked_at FROM {table} \
                 WHERE consumer = $1 ORDER BY id"
            ),
            discard: format!("DELETE FROM {table} WHERE id = $1"),
        }
    }

    /// The messages `consumer` parked, oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; [`StoreError::Corrupt`] for a row that does
    /// not decode.
    pub async fn list(
        &self,
        store: &PostgresStore,
        consumer: &str,
    ) -> Result<Vec<DeadMessage>, StoreError> {
        let failed = |e| pg_error("reading dead messages", e);
        let rows = sqlx::query(&self.list)
            .bind(consumer)
            .fetch_all(store.pool())
            .await
            .map_err(failed)?;
        rows.iter()
            .map(|row| {
                let headers: serde_json::Value = row.try_get("headers").map_err(failed)?;
                let headers = serde_json::from_value(headers).map_err(|e| StoreError::Corrupt {
                    table: self.table.clone(),
                    what: format!("headers of a dead message: {e}"),
                })?;
                let id: i64 = row.try_get("id").map_err(failed)?;
                let sequence: i64 = row.try_get("stream_sequence").map_err(failed)?;
                let deliveries: i32 = row.try_get("deliveries").map_err(failed)?;
                Ok(DeadMessage {
                    id: u64::try_from(id).unwrap_or_default(),
                    consumer: row.try_get("consumer").map_err(failed)?,
                    message_id: row.try_get("message_id").map_err(failed)?,
                    stream: row.try_get("stream").map_err(failed)?,
                    stream_sequence: u64::try_from(sequence).unwrap_or_default(),
                    subject: row.try_get("subject").map_err(failed)?,
                    headers,
                    payload: row.try_get("payload").map_err(failed)?,
                    deliveries: u64::try_from(deliveries).unwrap_or_default(),
                    error: row.try_get("error").map_err(failed)?,
                    parked_at: row.try_get("parked_at").map_err(failed)?,
                })
            })
            .collect()
    }

    /// Deletes a dead letter; `false` if it did not exist.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn discard(&self, store: &PostgresStore, id: u64) -> Result<bool, StoreError> {
        let deleted = sqlx::query(&self.discard)
            .bind(i64::try_from(id).unwrap_or(i64::MAX))
            .execute(store.pool())
            .await
            .map_err(|e| pg_error("discarding a dead message", e))?
            .rows_affected();
        Ok(deleted == 1)
    }
}

#[async_trait]
impl DeadMessageStore<PostgresStore> for PostgresDeadMessages {
    async fn park(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        consumer: &str,
        message: &ReceivedMessage,
        error: &str,
    ) -> Result<(), StoreError> {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, values) in message.headers.iter() {
            headers
                .entry(AsRef::<str>::as_ref(name).to_owned())
                .or_default()
                .extend(values.iter().map(|v| v.as_str().to_owned()));
        }
        let headers = serde_json::to_value(headers).map_err(|e| StoreError::Corrupt {
            table: self.table.clone(),
            what: format!("headers of message {}: {e}", message.message_id),
        })?;
        sqlx::query(&self.insert)
            .bind(consumer)
            .bind(&message.message_id)
            .bind(&message.stream)
            .bind(i64::try_from(message.stream_sequence).unwrap_or(i64::MAX))
            .bind(&message.subject)
            .bind(headers)
            .bind(&message.payload)
            .bind(i32::try_from(message.deliveries).unwrap_or(i32::MAX))
            .bind(error)
            .execute(&mut **tx)
            .await
            .map_err(|e| pg_error("parking a message", e))?;
        Ok(())
    }
}
