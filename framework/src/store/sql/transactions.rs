//! `Transactional`, `AppendInTransaction` and `CopyTarget` for a SQL backend: a write
//! transaction of the driver, committed and then readers woken, and appends
//! inside it counted for that wake-up. The backend provides `begin_write`,
//! `append_on`, `append_copied_in`, `claim_on`, `appended_in_transaction`, `appends_committed`
//! and its error helpers `db` and `classify`.

/// Implements `Transactional` (with `Transaction = sqlx::Transaction<'static,
/// $database>`) and `AppendInTransaction` for `$store`; `$doc` documents its
/// transaction type, `$append_doc` its appends.
macro_rules! sql_transactions {
    (
        store: $store:ty,
        database: $database:ty,
        db: $db:path,
        classify: $classify:path,
        transaction: $doc:literal,
        append: $append_doc:literal $(,)?
    ) => {
        #[async_trait::async_trait]
        impl $crate::port::events::Transactional for $store {
            #[doc = $doc]
            type Transaction = sqlx::Transaction<'static, $database>;

            async fn begin(&self) -> Result<Self::Transaction, $crate::error::StoreError> {
                self.begin_write("starting a transaction").await
            }

            async fn commit(&self, tx: Self::Transaction) -> Result<(), $crate::error::StoreError> {
                tx.commit().await.map_err($db("committing a transaction"))?;
                self.appends_committed();
                Ok(())
            }

            fn classify(
                &self,
                error: &(dyn std::error::Error + 'static),
            ) -> Option<$crate::error::ErrorKind> {
                error.downcast_ref::<sqlx::Error>().map($classify)
            }
        }

        #[async_trait::async_trait]
        impl $crate::port::events::AppendInTransaction for $store {
            /// Appends inside the caller's transaction, so the events commit
            /// or roll back with the caller's own writes; commit with
            /// [`Transactional::commit`](crate::Transactional::commit) so log
            /// readers look at once.
            ///
            #[doc = $append_doc]
            async fn append_in(
                &self,
                tx: &mut Self::Transaction,
                request: $crate::event::AppendRequest,
            ) -> Result<Vec<$crate::event::RecordedEvent>, $crate::error::StoreError> {
                let written = self.append_on(tx, request).await?;
                if !written.is_empty() {
                    self.appended_in_transaction();
                }
                Ok(written)
            }

            async fn claim_command_in(
                &self,
                tx: &mut Self::Transaction,
                aggregate_type: &str,
                aggregate_id: &str,
                command_id: uuid::Uuid,
                version: u64,
            ) -> Result<(), $crate::error::StoreError> {
                self.claim_on(tx, aggregate_type, aggregate_id, command_id, version)
                    .await
            }
        }

        #[async_trait::async_trait]
        impl $crate::port::events::CopyTarget for $store {
            /// One transaction of its own per batch.
            async fn append_batch(
                &self,
                groups: &[($crate::event::AppendRequest, chrono::DateTime<chrono::Utc>)],
            ) -> Result<(), $crate::error::StoreError> {
                use $crate::port::events::Transactional;
                let mut tx = self.begin().await?;
                for (request, at) in groups {
                    self.append_copied_in(&mut tx, request.clone(), *at).await?;
                }
                self.commit(tx).await
            }
        }
    };
}

pub(crate) use sql_transactions;
