//! View tables in PostgreSQL: one read and one `UNNEST` upsert per batch.

use async_trait::async_trait;
use cqrs_es::{Aggregate, View};
use sqlx::{PgExecutor, Postgres, Row, Transaction};

use super::{ViewProjection, ViewStore};
use crate::error::StoreError;
use crate::event::RecordedEvent;
use crate::log::LogFilter;
use crate::projection::{HandlerError, Projection};
use crate::store::postgres::{pg_error, PostgresStore};

impl<A, V> ViewProjection<A, V>
where
    A: Aggregate + 'static,
    V: View<A> + 'static,
{
    /// Creates the view table in PostgreSQL if it does not exist (the
    /// runner does it when it starts; call it when you need the table
    /// earlier).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn create_table<'e>(&self, executor: impl PgExecutor<'e>) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                view_id text PRIMARY KEY,
                version bigint NOT NULL CHECK (version >= 0),
                payload json NOT NULL)",
            self.table
        ))
        .execute(executor)
        .await
        .map_err(|e| pg_error("creating a view table", e))?;
        Ok(())
    }

    /// Reads one view from PostgreSQL (see also [`query`](Self::query)).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; [`StoreError::Corrupt`] when the stored JSON
    /// does not fit `V`.
    pub async fn load<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        view_id: &str,
    ) -> Result<Option<V>, StoreError> {
        let payload = payload(executor, &self.table, view_id).await?;
        payload
            .map(|payload| {
                serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt {
                    table: self.table.clone(),
                    what: format!("view `{view_id}` does not deserialize: {e}"),
                })
            })
            .transpose()
    }
}

async fn payload<'e>(
    executor: impl PgExecutor<'e>,
    table: &str,
    view_id: &str,
) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar(&format!(
        "SELECT v.payload::text FROM {table} v WHERE v.view_id = $1"
    ))
    .bind(view_id)
    .fetch_optional(executor)
    .await
    .map_err(|e| pg_error("reading a view", e))
}

#[async_trait]
impl ViewStore for PostgresStore {
    async fn view_payload(&self, table: &str, view_id: &str) -> Result<Option<String>, StoreError> {
        payload(self.pool(), table, view_id).await
    }
}

#[async_trait]
impl<A, V> Projection<PostgresStore> for ViewProjection<A, V>
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
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        let decoded = self.keyed(events)?;
        let keys = Self::keys(&decoded);
        if keys.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query(&format!(
            "SELECT v.view_id, v.version, v.payload::text AS payload FROM {} v \
             WHERE v.view_id = ANY($1::text[])",
            self.table
        ))
        .bind(&keys)
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
        let views = Self::fold(stored, &decoded);
        let mut ids = Vec::with_capacity(views.len());
        let mut versions = Vec::with_capacity(views.len());
        let mut payloads = Vec::with_capacity(views.len());
        for (key, view, version) in &views {
            ids.push(key.clone());
            versions.push(*version);
            payloads.push(serde_json::to_string(view)?);
        }
        sqlx::query(&format!(
            "INSERT INTO {} AS v (view_id, version, payload)
             SELECT k, n, p::json FROM UNNEST($1::text[], $2::bigint[], $3::text[]) AS u(k, n, p)
             ON CONFLICT (view_id) DO UPDATE SET version = EXCLUDED.version, payload = EXCLUDED.payload",
            self.table
        ))
        .bind(&ids)
        .bind(&versions)
        .bind(&payloads)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Creates the view table if it does not exist.
    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        self.create_table(&mut **tx).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(&format!("DELETE FROM {}", self.table))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
