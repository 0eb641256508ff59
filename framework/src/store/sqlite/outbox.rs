//! The outbox on SQLite: messages in `<events table>_outbox`, delivered in
//! id order.
//!
//! The invariant: SQLite runs one write transaction at a time and a
//! transaction keeps the write lock from its first write to its commit, so
//! row ids are handed out in commit order and a reader's snapshot always
//! holds a prefix of them; a read after the cursor can neither skip a message
//! that commits later nor let one overtake a message of its key. Nothing is
//! ever held back. Relays in this process are woken at once; SQLite has no
//! signal between processes, so relays elsewhere find messages at their next
//! poll.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Row, Sqlite, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::projection_store::begin_immediate;
use super::rows::{corrupt, micros_column, u64_column};
use super::{db, to_i64, SqliteStore};
use crate::error::{ConfigError, StoreError};
use crate::event::Checkpoint;
use crate::port::outbox::{
    OutboxMessage, OutboxMessageRecord, OutboxSettings, OutboxStore, OutboxTable, Pending,
};

/// The outbox of one events table on SQLite, its statements rendered.
#[derive(Debug)]
pub struct SqliteOutbox {
    store: SqliteStore,
    table: String,
    sql: Queries,
}

#[async_trait]
impl OutboxStore for SqliteStore {
    type Database = Sqlite;
    type Outbox = SqliteOutbox;

    async fn open_outbox(&self, settings: &OutboxSettings) -> Result<SqliteOutbox, StoreError> {
        let table = settings.outbox_table(self.events_table())?;
        let sql = Queries::new(|sql| sql.trim().replace("{outbox}", &table.quoted()));
        let exists: bool = sqlx::query_scalar(&sql.table_exists)
            .bind(table.to_string())
            .fetch_one(self.pool())
            .await
            .map_err(db("looking for the outbox table"))?;
        if !exists {
            return Err(ConfigError::MissingTable {
                table: table.to_string(),
                hint: "apply the store's migrations (SqliteStoreBuilder::migrate)",
            }
            .into());
        }
        Ok(SqliteOutbox {
            store: self.clone(),
            table: table.to_string(),
            sql,
        })
    }
}

#[async_trait]
impl OutboxTable<SqliteStore> for SqliteOutbox {
    fn table(&self) -> &str {
        &self.table
    }

    fn channel(&self) -> &str {
        ""
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        begin_immediate(self.store.writer())
            .await
            .map_err(db("starting an outbox transaction"))
    }

    async fn commit(&self, tx: Transaction<'_, Sqlite>) -> Result<(), StoreError> {
        tx.commit()
            .await
            .map_err(db("committing a transaction with outbox messages"))
    }

    async fn enqueue(
        &self,
        connection: &mut SqliteConnection,
        message: &OutboxMessage,
        headers: &str,
    ) -> Result<bool, StoreError> {
        sqlx::query(&self.sql.enqueue)
            .bind(message.message_id)
            .bind(&message.key)
            .bind(&message.topic)
            .bind(message.payload.to_string())
            .bind(headers)
            .bind(Utc::now().timestamp_micros())
            .execute(&mut *connection)
            .await
            .map_err(db("enqueueing an outbox message"))?;
        Ok(true)
    }

    async fn read(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<OutboxMessageRecord>, StoreError> {
        let rows = sqlx::query(&self.sql.read)
            .bind(to_i64(after.position))
            .bind(to_i64(limit as u64))
            .fetch_all(self.store.pool())
            .await
            .map_err(db("reading the outbox"))?;
        rows.iter()
            .map(|row| record_from_row(row, &self.table))
            .collect()
    }

    async fn held_back(&self, _after: Checkpoint) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn pending(&self, after: Checkpoint, cap: u64) -> Result<Pending, StoreError> {
        let failed = || db("counting pending outbox messages");
        let row = sqlx::query(&self.sql.pending)
            .bind(to_i64(after.position))
            .bind(to_i64(cap))
            .fetch_one(self.store.pool())
            .await
            .map_err(failed())?;
        let count: i64 = row.try_get("pending").map_err(failed())?;
        let oldest: Option<i64> = row.try_get("oldest").map_err(failed())?;
        let now = Utc::now().timestamp_micros();
        Ok(Pending {
            count: u64::try_from(count).unwrap_or(0),
            oldest_age: oldest
                .map(|micros| Duration::from_micros(u64::try_from(now - micros).unwrap_or(0))),
        })
    }

    async fn mark_delivered(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        ids: &[u64],
    ) -> Result<(), StoreError> {
        let ids = serde_json::to_string(ids).map_err(|source| StoreError::Serialize {
            what: "delivered outbox message ids",
            aggregate_type: self.table.clone(),
            aggregate_id: String::new(),
            source,
        })?;
        sqlx::query(&self.sql.mark_delivered)
            .bind(Utc::now().timestamp_micros())
            .bind(ids)
            .execute(&mut **tx)
            .await
            .map_err(db("marking outbox messages delivered"))?;
        Ok(())
    }

    async fn cleanup_batch(&self, retention: Duration, limit: u64) -> Result<u64, StoreError> {
        let retention = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        let before = Utc::now().timestamp_micros().saturating_sub(retention);
        let mut tx = begin_immediate(self.store.writer())
            .await
            .map_err(db("deleting delivered outbox messages"))?;
        let deleted = sqlx::query(&self.sql.cleanup)
            .bind(before)
            .bind(to_i64(limit))
            .execute(&mut *tx)
            .await
            .map_err(db("deleting delivered outbox messages"))?
            .rows_affected();
        tx.commit()
            .await
            .map_err(db("deleting delivered outbox messages"))?;
        Ok(deleted)
    }

    async fn rebase(
        &self,
        _tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<Option<u64>, StoreError> {
        // Ids come from the file itself: a copy of it carries them on.
        Ok(None)
    }

    fn notify_others(&self) {}

    async fn listen(&self, _wake: &(dyn Fn() + Send + Sync), _stop: &CancellationToken) {}
}

crate::store::sql::statements::sql_statements! {
    /// The outbox statements, one `.sql` file each under `queries/outbox/`.
    struct Queries in "queries/outbox/" {
        table_exists,
        enqueue,
        read,
        mark_delivered,
        cleanup,
        pending,
    }
}

fn record_from_row(row: &SqliteRow, table: &str) -> Result<OutboxMessageRecord, StoreError> {
    let get = || db("decoding an outbox message");
    let id = u64_column(row, "id", table)?;
    let message_id: Uuid = row.try_get("message_id").map_err(get())?;
    let payload: &str = row.try_get("payload").map_err(get())?;
    let payload = serde_json::from_str(payload)
        .map_err(|e| corrupt(table, &format!("payload of message {id} is not JSON: {e}")))?;
    let headers: &str = row.try_get("headers").map_err(get())?;
    let headers = serde_json::from_str(headers).map_err(|e| {
        corrupt(
            table,
            &format!("headers of message {id} are not a map of strings: {e}"),
        )
    })?;
    let created_at: i64 = row.try_get("created_at").map_err(get())?;
    Ok(OutboxMessageRecord {
        id,
        transaction_id: 0,
        message_id,
        key: row.try_get("key").map_err(get())?,
        topic: row.try_get("topic").map_err(get())?,
        payload,
        headers,
        created_at: micros_column(created_at, table)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outbox_statement_is_rendered() {
        let queries = Queries::new(|sql| sql.trim().replace("{outbox}", "\"events_outbox\""));
        crate::store::sql::statements::assert_rendered(queries.statements(), &[]);
    }
}
