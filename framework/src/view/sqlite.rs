//! View tables in SQLite: the batch's views read in one statement, then
//! one upsert per view (statements are cheap in-process).

use async_trait::async_trait;
use cqrs_es::{Aggregate, View};
use sqlx::{Row, Sqlite, Transaction};

use super::{ViewProjection, ViewStore};
use crate::error::StoreError;
use crate::event::RecordedEvent;
use crate::log::LogFilter;
use crate::projection::{HandlerError, Projection};
use crate::store::sqlite::{db, SqliteStore};

#[async_trait]
impl ViewStore for SqliteStore {
    async fn view_payload(&self, table: &str, view_id: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT v.payload FROM {table} v WHERE v.view_id = ?1"
        ))
        .bind(view_id)
        .fetch_optional(self.readers())
        .await
        .map_err(db("reading a view"))
    }
}

#[async_trait]
impl<A, V> Projection<SqliteStore> for ViewProjection<A, V>
where
    A: Aggregate + 'static,
    V: View<A> + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types([A::TYPE])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), HandlerError> {
        let decoded = self.keyed(events)?;
        let keys = Self::keys(&decoded);
        if keys.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query(&format!(
            "SELECT v.view_id, v.version, v.payload FROM {} v \
             WHERE v.view_id IN (SELECT value FROM json_each(?1))",
            self.table
        ))
        .bind(serde_json::to_string(&keys)?)
        .fetch_all(&mut **tx)
        .await?;
        let mut stored = Vec::with_capacity(rows.len());
        for row in rows {
            let payload: String = row.try_get("payload")?;
            stored.push((
                row.try_get("view_id")?,
                serde_json::from_str::<V>(&payload)?,
                row.try_get::<i64, _>("version")?,
            ));
        }
        let upsert = format!(
            "INSERT INTO {} (view_id, version, payload) VALUES (?1, ?2, ?3) \
             ON CONFLICT (view_id) DO UPDATE SET version = excluded.version, payload = excluded.payload",
            self.table
        );
        for (key, view, version) in Self::fold(stored, &decoded) {
            sqlx::query(&upsert)
                .bind(key)
                .bind(version)
                .bind(serde_json::to_string(&view)?)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Creates the view table if it does not exist.
    async fn setup(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), HandlerError> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                view_id TEXT PRIMARY KEY,
                version INTEGER NOT NULL CHECK (version >= 0),
                payload TEXT NOT NULL)",
            self.table
        ))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), HandlerError> {
        sqlx::query(&format!("DELETE FROM {}", self.table))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
