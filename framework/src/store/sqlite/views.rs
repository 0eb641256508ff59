//! View tables in SQLite: a batch's documents read in one statement, then
//! one upsert per document (statements are cheap in-process).

use async_trait::async_trait;
use sqlx::{Row, Sqlite, Transaction};

use super::{db, SqliteStore};
use crate::error::StoreError;
use crate::port::views::ViewStore;

#[async_trait]
impl ViewStore for SqliteStore {
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        Some(SqliteStore::key_ring(self))
    }

    async fn view_payload(&self, table: &str, view_id: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT v.payload FROM {table} v WHERE v.view_id = ?1"
        ))
        .bind(view_id)
        .fetch_optional(self.readers())
        .await
        .map_err(db("reading a view"))
    }

    async fn view_payloads(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query_as(&format!(
            "SELECT v.view_id, v.payload FROM {table} v \
             WHERE ?1 IS NULL OR v.view_id > ?1 ORDER BY v.view_id LIMIT ?2"
        ))
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.readers())
        .await
        .map_err(db("reading views"))
    }

    async fn documents_in(
        tx: &mut Transaction<'static, Sqlite>,
        table: &str,
        ids: &[String],
    ) -> Result<Vec<(String, i64, String)>, StoreError> {
        let ids = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt {
            table: table.to_owned(),
            what: format!("ids do not serialize: {e}"),
        })?;
        let rows = sqlx::query(&format!(
            "SELECT v.view_id, v.version, v.payload FROM {table} v \
             WHERE v.view_id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(ids)
        .fetch_all(&mut **tx)
        .await
        .map_err(db("reading views"))?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("view_id").map_err(db("reading views"))?,
                    row.try_get("version").map_err(db("reading views"))?,
                    row.try_get("payload").map_err(db("reading views"))?,
                ))
            })
            .collect()
    }

    async fn save_documents(
        tx: &mut Transaction<'static, Sqlite>,
        table: &str,
        documents: &[(String, i64, String)],
    ) -> Result<(), StoreError> {
        let upsert = format!(
            "INSERT INTO {table} (view_id, version, payload) VALUES (?1, ?2, ?3) \
             ON CONFLICT (view_id) DO UPDATE SET version = excluded.version, payload = excluded.payload"
        );
        for (id, version, payload) in documents {
            sqlx::query(&upsert)
                .bind(id)
                .bind(version)
                .bind(payload)
                .execute(&mut **tx)
                .await
                .map_err(db("writing a view"))?;
        }
        Ok(())
    }

    async fn create_documents(
        tx: &mut Transaction<'static, Sqlite>,
        table: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                view_id TEXT PRIMARY KEY,
                version INTEGER NOT NULL CHECK (version >= 0),
                payload TEXT NOT NULL)"
        ))
        .execute(&mut **tx)
        .await
        .map_err(db("creating a view table"))?;
        Ok(())
    }

    async fn clear_documents(
        tx: &mut Transaction<'static, Sqlite>,
        table: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut **tx)
            .await
            .map_err(db("emptying a view table"))?;
        Ok(())
    }
}
