//! View tables in PostgreSQL: a batch's documents read in one statement
//! and written in one `UNNEST` upsert.

use async_trait::async_trait;
use cqrs_es::{Aggregate, View};
use sqlx::{PgExecutor, Postgres, Row, Transaction};

use super::errors::pg_error;
use super::PostgresStore;
use crate::error::StoreError;
use crate::port::views::ViewStore;
use crate::view::ViewProjection;

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
        create_table(executor, &self.table).await
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

async fn create_table<'e>(executor: impl PgExecutor<'e>, table: &str) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            view_id text PRIMARY KEY,
            version bigint NOT NULL CHECK (version >= 0),
            payload json NOT NULL)"
    ))
    .execute(executor)
    .await
    .map_err(|e| pg_error("creating a view table", e))?;
    Ok(())
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
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        Some(PostgresStore::key_ring(self))
    }

    async fn view_payload(&self, table: &str, view_id: &str) -> Result<Option<String>, StoreError> {
        payload(self.pool(), table, view_id).await
    }

    async fn view_payloads(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query_as(&format!(
            "SELECT v.view_id, v.payload::text FROM {table} v \
             WHERE $1::text IS NULL OR v.view_id > $1 ORDER BY v.view_id LIMIT $2"
        ))
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(|e| pg_error("reading views", e))
    }

    async fn documents_in(
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        ids: &[String],
    ) -> Result<Vec<(String, i64, String)>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT v.view_id, v.version, v.payload::text AS payload FROM {table} v \
             WHERE v.view_id = ANY($1::text[])"
        ))
        .bind(ids)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| pg_error("reading views", e))?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("view_id")
                        .map_err(|e| pg_error("reading views", e))?,
                    row.try_get("version")
                        .map_err(|e| pg_error("reading views", e))?,
                    row.try_get("payload")
                        .map_err(|e| pg_error("reading views", e))?,
                ))
            })
            .collect()
    }

    /// One `UNNEST` upsert for all documents.
    async fn save_documents(
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        documents: &[(String, i64, String)],
    ) -> Result<(), StoreError> {
        let mut ids = Vec::with_capacity(documents.len());
        let mut versions = Vec::with_capacity(documents.len());
        let mut payloads = Vec::with_capacity(documents.len());
        for (id, version, payload) in documents {
            ids.push(id.as_str());
            versions.push(*version);
            payloads.push(payload.as_str());
        }
        sqlx::query(&format!(
            "INSERT INTO {table} AS v (view_id, version, payload)
             SELECT k, n, p::json FROM UNNEST($1::text[], $2::bigint[], $3::text[]) AS u(k, n, p)
             ON CONFLICT (view_id) DO UPDATE SET version = EXCLUDED.version, payload = EXCLUDED.payload"
        ))
        .bind(&ids)
        .bind(&versions)
        .bind(&payloads)
        .execute(&mut **tx)
        .await
        .map_err(|e| pg_error("writing views", e))?;
        Ok(())
    }

    async fn create_documents(
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
    ) -> Result<(), StoreError> {
        create_table(&mut **tx, table).await
    }

    async fn clear_documents(
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut **tx)
            .await
            .map_err(|e| pg_error("emptying a view table", e))?;
        Ok(())
    }
}
