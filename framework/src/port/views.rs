//! The views' port: a backend that keeps view tables (JSON documents by id
//! with a version) for [`ViewProjection`](crate::view::ViewProjection)s and
//! [process managers](crate::process). Each backend implements it in its own
//! `views.rs`.

use async_trait::async_trait;

use crate::error::StoreError;
use crate::port::projections::{Checkpoints, DeadLetters};

/// A backend that keeps view tables: [`PostgresStore`](crate::PostgresStore)
/// and `SqliteStore`. Implemented by Outflow only.
///
/// A view table holds JSON documents by id with a version (`view_id`,
/// `version`, `payload`); [`ViewProjection`](crate::view::ViewProjection) and the
/// [process managers](crate::process) keep their state in such tables.
#[async_trait]
pub trait ViewStore: Checkpoints + DeadLetters + Clone {
    /// The stored JSON text of one view, if any.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    #[doc(hidden)]
    async fn view_payload(&self, table: &str, view_id: &str) -> Result<Option<String>, StoreError>;

    /// Up to `limit` views in id order, after `after` when given.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    #[doc(hidden)]
    async fn view_payloads(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError>;

    /// The stored documents among `ids`: (id, version, JSON text).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    #[doc(hidden)]
    async fn documents_in(
        tx: &mut Self::Transaction,
        table: &str,
        ids: &[String],
    ) -> Result<Vec<(String, i64, String)>, StoreError>;

    /// Inserts or replaces documents: (id, version, JSON text).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    #[doc(hidden)]
    async fn save_documents(
        tx: &mut Self::Transaction,
        table: &str,
        documents: &[(String, i64, String)],
    ) -> Result<(), StoreError>;

    /// Creates a document table if it does not exist.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    #[doc(hidden)]
    async fn create_documents(tx: &mut Self::Transaction, table: &str) -> Result<(), StoreError>;

    /// Deletes every document of a table.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    #[doc(hidden)]
    async fn clear_documents(tx: &mut Self::Transaction, table: &str) -> Result<(), StoreError>;

    /// The ring that opens the personal values of the views and states
    /// read from this store outside the projection runner (a query); see
    /// [`crate::personal`]. The default has none.
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        None
    }
}
