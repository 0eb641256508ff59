//! The outbox on PostgreSQL: messages in `<events table>_outbox`, delivered in
//! `(transaction id, id)` order.
//!
//! The invariant: a read serves only rows of transactions older than the
//! oldest transaction still in flight, so a message whose transaction took a
//! lower id and commits later is never skipped; and an enqueue is refused
//! when a newer transaction already committed a message of the same key, so
//! no message overtakes one of its key that committed before it. Relays on
//! other nodes are woken by a coalesced `NOTIFY` on `<channel>_outbox`.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::errors::{begin_owned, db, pg_error, to_i64};
use super::notify::{listen_until, spawn_notifier, Signal};
use super::PostgresStore;
use crate::error::{ConfigError, StoreError};
use crate::event::Checkpoint;
use crate::port::outbox::{
    OutboxMessage, OutboxMessageRecord, OutboxSettings, OutboxStore, OutboxTable, Pending,
};

/// The outbox of one events table on PostgreSQL, its statements rendered.
#[derive(Debug)]
pub struct PostgresOutbox {
    store: PostgresStore,
    table: String,
    channel: String,
    sql: Queries,
    notify: Option<mpsc::Sender<()>>,
    /// Stops the notifier when the last handle is dropped.
    shutdown: CancellationToken,
}

impl Drop for PostgresOutbox {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[async_trait]
impl OutboxStore for PostgresStore {
    type Database = Postgres;
    type Outbox = PostgresOutbox;

    async fn open_outbox(&self, settings: &OutboxSettings) -> Result<PostgresOutbox, StoreError> {
        let table = settings.outbox_table(self.events_table())?;
        let channel = format!("{}_outbox", self.channel());
        if channel.len() > 63 {
            return Err(StoreError::InvalidIdentifier {
                what: "outbox notification channel derived from the events table",
                name: channel,
                reason: "longer than 63 bytes",
            });
        }
        let sql = Queries::new(|sql| sql.trim().replace("{outbox}", &table.quoted()));
        let exists: bool = sqlx::query_scalar(&sql.table_exists)
            .bind(table.quoted())
            .fetch_one(self.pool())
            .await
            .map_err(db("looking for the outbox table"))?;
        if !exists {
            return Err(ConfigError::MissingTable {
                table: table.to_string(),
                hint: "apply the store's migrations (PostgresStoreBuilder::migrate or \
                       PostgresStore::migrate)",
            }
            .into());
        }
        let shutdown = CancellationToken::new();
        let notify = settings.notify_other_nodes.then(|| {
            spawn_notifier(
                self.pool().clone(),
                channel.clone(),
                String::new(),
                settings.notify_interval,
                shutdown.clone(),
            )
        });
        Ok(PostgresOutbox {
            store: self.clone(),
            table: table.to_string(),
            channel,
            sql,
            notify,
            shutdown,
        })
    }
}

#[async_trait]
impl OutboxTable<PostgresStore> for PostgresOutbox {
    fn table(&self) -> &str {
        &self.table
    }

    fn channel(&self) -> &str {
        &self.channel
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        begin_owned(self.store.pool())
            .await
            .map_err(db("starting an outbox transaction"))
    }

    async fn commit(&self, tx: Transaction<'_, Postgres>) -> Result<(), StoreError> {
        tx.commit()
            .await
            .map_err(db("committing a transaction with outbox messages"))
    }

    async fn enqueue(
        &self,
        connection: &mut PgConnection,
        message: &OutboxMessage,
        headers: &str,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(&self.sql.enqueue)
            .bind(message.message_id)
            .bind(&message.key)
            .bind(&message.topic)
            .bind(message.payload.to_string())
            .bind(headers)
            .fetch_optional(&mut *connection)
            .await
            .map_err(db("enqueueing an outbox message"))?;
        Ok(inserted.is_some())
    }

    async fn read(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<OutboxMessageRecord>, StoreError> {
        let rows = sqlx::query(&self.sql.read)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .bind(to_i64(limit as u64))
            .fetch_all(self.store.pool())
            .await
            .map_err(db("reading the outbox"))?;
        rows.iter()
            .map(|row| record_from_row(row, &self.table))
            .collect()
    }

    async fn held_back(&self, after: Checkpoint) -> Result<bool, StoreError> {
        sqlx::query_scalar(&self.sql.held_back)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .fetch_one(self.store.pool())
            .await
            .map_err(db("looking for held-back outbox messages"))
    }

    async fn pending(&self, after: Checkpoint, cap: u64) -> Result<Pending, StoreError> {
        let failed = || db("counting pending outbox messages");
        let row = sqlx::query(&self.sql.pending)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .bind(to_i64(cap))
            .fetch_one(self.store.pool())
            .await
            .map_err(failed())?;
        let count: i64 = row.try_get("pending").map_err(failed())?;
        let age: Option<f64> = row.try_get("oldest_age_seconds").map_err(failed())?;
        Ok(Pending {
            count: u64::try_from(count).unwrap_or(0),
            oldest_age: age
                .map(|seconds| Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default()),
        })
    }

    async fn mark_delivered(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        ids: &[u64],
    ) -> Result<(), StoreError> {
        let ids: Vec<i64> = ids.iter().map(|&id| to_i64(id)).collect();
        sqlx::query(&self.sql.mark_delivered)
            .bind(&ids)
            .execute(&mut **tx)
            .await
            .map_err(db("marking outbox messages delivered"))?;
        Ok(())
    }

    async fn cleanup_batch(&self, retention: Duration, limit: u64) -> Result<u64, StoreError> {
        Ok(sqlx::query(&self.sql.cleanup)
            .bind(retention.as_secs_f64())
            .bind(to_i64(limit))
            .execute(self.store.pool())
            .await
            .map_err(db("deleting delivered outbox messages"))?
            .rows_affected())
    }

    async fn rebase(
        &self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<Option<u64>, StoreError> {
        let failed = || db("rebasing the outbox after a restore");
        let ahead: bool = sqlx::query_scalar(&self.sql.ahead)
            .fetch_one(&mut **tx)
            .await
            .map_err(failed())?;
        if !ahead {
            return Ok(None);
        }
        let mut changed = 0;
        for sql in [&self.sql.rebase_delivered, &self.sql.rebase_pending] {
            changed += sqlx::query(sql)
                .execute(&mut **tx)
                .await
                .map_err(failed())?
                .rows_affected();
        }
        Ok(Some(changed))
    }

    fn notify_others(&self) {
        if let Some(notify) = &self.notify {
            // Full means a NOTIFY is already pending: this commit rides on it.
            let _ = notify.try_send(());
        }
    }

    async fn listen(&self, wake: &(dyn Fn() + Send + Sync), stop: &CancellationToken) {
        let on_signal = |_: Signal<'_>| {
            wake();
            true
        };
        listen_until(self.store.pool(), &[self.channel.as_str()], stop, on_signal).await;
    }
}

crate::store::sql::statements::sql_statements! {
    /// The outbox statements, one `.sql` file each under `queries/outbox/`.
    struct Queries in "queries/outbox/" {
        table_exists,
        enqueue,
        read,
        held_back,
        mark_delivered,
        cleanup,
        pending,
        ahead,
        rebase_delivered,
        rebase_pending,
    }
}

fn record_from_row(row: &PgRow, table: &str) -> Result<OutboxMessageRecord, StoreError> {
    let get = |e| pg_error("decoding an outbox message", e);
    let corrupt = |what: String| StoreError::Corrupt {
        table: table.to_owned(),
        what,
    };
    let id: i64 = row.try_get("id").map_err(get)?;
    let id = u64::try_from(id).map_err(|_| corrupt(format!("negative id {id}")))?;
    let txid: String = row.try_get("txid").map_err(get)?;
    let transaction_id = txid
        .parse()
        .map_err(|_| corrupt(format!("transaction id `{txid}` is not a number")))?;
    let headers: Value = row.try_get("headers").map_err(get)?;
    let headers = serde_json::from_value(headers).map_err(|e| {
        corrupt(format!(
            "headers of message {id} are not a map of strings: {e}"
        ))
    })?;
    Ok(OutboxMessageRecord {
        id,
        transaction_id,
        message_id: row.try_get("message_id").map_err(get)?,
        key: row.try_get("key").map_err(get)?,
        topic: row.try_get("topic").map_err(get)?,
        payload: row.try_get("payload").map_err(get)?,
        headers,
        created_at: row.try_get("created_at").map_err(get)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outbox_query_is_rendered() {
        let queries = Queries::new(|sql| sql.trim().replace("{outbox}", "\"events_outbox\""));
        crate::store::sql::statements::assert_rendered(queries.statements(), &[]);
    }
}
