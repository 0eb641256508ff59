//! The in-memory store's keys for personal data: a [`MemoryKeyStore`], and
//! erasures recorded in the store's log.

use std::sync::{Arc, Weak};

use async_trait::async_trait;

use super::state::{Inner, MemoryStore};
use crate::error::StoreError;
use crate::personal::{KeyRing, KeyStore, MemoryKeyStore, SecretKey, SubjectKey};
use crate::port::events::EventStore;

/// The store's keys, holding the store weakly (the ring lives in it).
struct StoreKeys {
    keys: MemoryKeyStore,
    store: Weak<Inner>,
}

#[async_trait]
impl KeyStore for StoreKeys {
    async fn keys(&self, subjects: &[String]) -> Result<Vec<(String, SubjectKey)>, StoreError> {
        self.keys.keys(subjects).await
    }

    async fn create(&self, subject: &str, key: SecretKey) -> Result<SubjectKey, StoreError> {
        self.keys.create(subject, key).await
    }

    async fn forget(&self, subject: &str) -> Result<bool, StoreError> {
        if !self.keys.forget(subject).await? {
            return Ok(false);
        }
        if let Some(inner) = self.store.upgrade() {
            let store = MemoryStore { inner };
            let version = store
                .state()
                .streams
                .get(&(
                    crate::personal::ERASURE_STREAM.to_owned(),
                    subject.to_owned(),
                ))
                .map_or(0, |events| events.len() as u64);
            store
                .append(crate::personal::erasure(subject, version))
                .await?;
        }
        Ok(true)
    }
}

impl MemoryStore {
    /// The ring that seals and opens this store's personal values, over
    /// keys kept in memory with the store (see [`crate::personal`]).
    /// Forgetting a subject records a `SubjectForgotten` event in the log.
    pub fn key_ring(&self) -> KeyRing {
        self.inner
            .key_ring
            .get_or_init(|| {
                KeyRing::new(StoreKeys {
                    keys: self.inner.keys.clone(),
                    store: Arc::downgrade(&self.inner),
                })
            })
            .clone()
    }
}
