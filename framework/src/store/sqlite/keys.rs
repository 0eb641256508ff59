//! The subjects' keys on SQLite, in `<events table>_keys`; forgetting
//! a subject records its erasure in the log in the same transaction.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use sqlx::Row;

use super::errors::db_or_missing;
use super::{db, Inner, SqliteStore};
use crate::error::StoreError;
use crate::personal::{KeyRing, KeyStore, SecretKey, SubjectKey};
use crate::port::events::{AppendInTransaction, Transactional};

crate::store::sql::statements::sql_statements! {
    /// The keys' statements, one `.sql` file each under `queries/keys/`.
    pub(in crate::store::sqlite) struct KeyQueries in "queries/keys/" {
        keys,
        create,
        forget,
        stream_version,
    }
}

/// The store's keys, holding the store weakly (its ring lives in it).
struct StoreKeys(Weak<Inner>);

impl StoreKeys {
    fn store(&self) -> Result<SqliteStore, StoreError> {
        self.0
            .upgrade()
            .map(|inner| SqliteStore { inner })
            .ok_or(StoreError::Unsupported {
                what: "reading keys",
                reason: "the store was dropped",
            })
    }
}

/// A driver error of the keys' statements: a missing keys table is named,
/// with the migration that creates it.
fn keys_error(
    store: &SqliteStore,
    operation: &'static str,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    db_or_missing(
        operation,
        store.inner.tables.companion("keys"),
        "apply the store's migrations (SqliteStoreBuilder::migrate)",
    )
}

fn subject_key(subject: &str, key: Option<Vec<u8>>) -> Result<SubjectKey, StoreError> {
    match key {
        None => Ok(SubjectKey::Forgotten),
        Some(bytes) => {
            let bytes = zeroize::Zeroizing::new(bytes);
            SecretKey::from_bytes(&bytes)
                .map(SubjectKey::Active)
                .ok_or_else(|| StoreError::Corrupt {
                    table: "keys".to_owned(),
                    what: format!("the key of subject `{subject}` is not 32 bytes"),
                })
        }
    }
}

#[async_trait]
impl KeyStore for StoreKeys {
    async fn keys(&self, subjects: &[String]) -> Result<Vec<(String, SubjectKey)>, StoreError> {
        let store = self.store()?;
        let subjects = serde_json::to_string(subjects).map_err(|source| StoreError::Serialize {
            what: "subjects",
            aggregate_type: String::new(),
            aggregate_id: String::new(),
            source,
        })?;
        let rows = sqlx::query(&store.inner.queries.keys.keys)
            .bind(subjects)
            .fetch_all(&store.inner.readers)
            .await
            .map_err(keys_error(&store, "reading subjects' keys"))?;
        rows.into_iter()
            .map(|row| {
                let subject: String = row.try_get(0).map_err(db("reading subjects' keys"))?;
                let key: Option<Vec<u8>> = row.try_get(1).map_err(db("reading subjects' keys"))?;
                let key = subject_key(&subject, key)?;
                Ok((subject, key))
            })
            .collect()
    }

    async fn create(&self, subject: &str, key: SecretKey) -> Result<SubjectKey, StoreError> {
        let store = self.store()?;
        // What is kept now: this key, or the one a concurrent writer made.
        let kept: Option<Vec<u8>> = sqlx::query_scalar(&store.inner.queries.keys.create)
            .bind(subject)
            .bind(&key.bytes()[..])
            .fetch_one(&store.inner.writer)
            .await
            .map_err(keys_error(&store, "creating a subject's key"))?;
        subject_key(subject, kept)
    }

    async fn forget(&self, subject: &str) -> Result<bool, StoreError> {
        let store = self.store()?;
        let mut tx = store.begin_write("forgetting a subject").await?;
        let forgotten = sqlx::query(&store.inner.queries.keys.forget)
            .bind(subject)
            .fetch_optional(&mut *tx)
            .await
            .map_err(keys_error(&store, "forgetting a subject"))?
            .is_some();
        if !forgotten {
            return Ok(false);
        }
        let version: i64 = sqlx::query_scalar(&store.inner.queries.keys.stream_version)
            .bind(crate::personal::ERASURE_STREAM)
            .bind(subject)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("reading the erasure stream"))?;
        let version = u64::try_from(version).unwrap_or(0);
        store
            .append_in(&mut tx, crate::personal::erasure(subject, version))
            .await?;
        store.commit(tx).await?;
        // The key's page as it was lives on in the write-ahead log until
        // it is checkpointed and truncated (the file itself was overwritten:
        // `secure_delete`). Readers can delay it; the next forget, or the
        // last connection's close, finishes it.
        match store.truncate_wal().await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                subject,
                "readers kept the write-ahead log from being truncated after forgetting a \
                 subject: the old key stays in it until the next checkpoint"
            ),
            Err(error) => tracing::warn!(subject, error = %crate::error::error_chain(&error),
                "truncating the write-ahead log after forgetting a subject failed"),
        }
        Ok(true)
    }
}

impl SqliteStore {
    /// The ring that seals and opens this store's personal values, over
    /// the keys table `<events table>_keys` (see [`crate::personal`]).
    /// Forgetting a subject deletes its key and records a
    /// `SubjectForgotten` event in one transaction.
    pub fn key_ring(&self) -> KeyRing {
        self.inner
            .key_ring
            .get_or_init(|| {
                KeyRing::new(StoreKeys(Arc::downgrade(&self.inner)))
                    .cache_for(self.inner.keys_cached_for)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_statement_is_rendered() {
        let tables = super::super::schema::Tables::new("events").expect("tables");
        let queries = KeyQueries::new(|sql| tables.render(sql));
        crate::store::sql::statements::assert_rendered(queries.statements(), &[]);
        assert!(queries.forget.contains("\"events_keys\""));
    }
}
