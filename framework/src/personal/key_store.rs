//! Where subjects' keys are kept: the [`KeyStore`] trait and the in-memory
//! one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::OsRng;
use zeroize::Zeroizing;

use crate::error::StoreError;

/// A subject's 256-bit key, zeroized in memory when dropped; its `Debug`
/// prints nothing of it.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    /// A new random key, from the operating system's generator.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(key.as_mut());
        SecretKey(key)
    }

    /// A key from its 32 bytes (as a [`KeyStore`] read them); `None` when
    /// `bytes` is not 32 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        if bytes.len() != key.len() {
            return None;
        }
        key.copy_from_slice(bytes);
        Some(SecretKey(key))
    }

    /// The key's bytes, to store them.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// What a [`KeyStore`] holds for a subject.
#[derive(Debug, Clone)]
pub enum SubjectKey {
    /// The subject's key.
    Active(SecretKey),
    /// The subject was forgotten: its key is deleted, and no new key is
    /// made for it.
    Forgotten,
}

/// Keeps one key per data subject, apart from the events.
///
/// Implemented by `PostgresStore` and `SqliteStore` (a table of their own,
/// `<events table>_keys`), by [`MemoryKeyStore`] for tests, and by an
/// application for an external key store (a KMS, Vault): a
/// [`KeyRing`](super::KeyRing) over it caches what it reads.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use outflow::personal::{KeyStore, MemoryKeyStore, SecretKey, SubjectKey};
///
/// let keys = MemoryKeyStore::new();
/// let made = keys.create("user-1", SecretKey::generate()).await?;
/// // A second create keeps the first key.
/// let again = keys.create("user-1", SecretKey::generate()).await?;
/// match (made, again) {
///     (SubjectKey::Active(a), SubjectKey::Active(b)) => assert_eq!(a.bytes(), b.bytes()),
///     _ => unreachable!(),
/// }
/// assert!(keys.forget("user-1").await?);
/// assert!(matches!(keys.keys(&["user-1".into()]).await?[0].1, SubjectKey::Forgotten));
/// # Ok::<(), outflow::StoreError>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// What is kept for each of `subjects`; a subject with neither a key
    /// nor a record of being forgotten is left out.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the key store cannot be read.
    async fn keys(&self, subjects: &[String]) -> Result<Vec<(String, SubjectKey)>, StoreError>;

    /// Keeps `key` for `subject` unless the subject already has a key or
    /// was forgotten, and returns what is kept now (so two writers racing
    /// to create a subject's key both use the one that won).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the key store cannot be written.
    async fn create(&self, subject: &str, key: SecretKey) -> Result<SubjectKey, StoreError>;

    /// Deletes `subject`'s key and remembers that it was forgotten (so no
    /// new key is made for it). Returns `false` when it was forgotten
    /// before. The SQL stores record the erasure as an event in the same
    /// transaction (see [`ERASURE_STREAM`](super::ERASURE_STREAM)).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the key store cannot be written.
    async fn forget(&self, subject: &str) -> Result<bool, StoreError>;
}

#[async_trait]
impl<K: KeyStore + ?Sized> KeyStore for Arc<K> {
    async fn keys(&self, subjects: &[String]) -> Result<Vec<(String, SubjectKey)>, StoreError> {
        (**self).keys(subjects).await
    }

    async fn create(&self, subject: &str, key: SecretKey) -> Result<SubjectKey, StoreError> {
        (**self).create(subject, key).await
    }

    async fn forget(&self, subject: &str) -> Result<bool, StoreError> {
        (**self).forget(subject).await
    }
}

/// Keys in memory, for tests and documentation (and the in-memory store's
/// key ring). Clones share the keys.
#[derive(Debug, Clone, Default)]
pub struct MemoryKeyStore {
    keys: Arc<Mutex<HashMap<String, SubjectKey>>>,
}

impl MemoryKeyStore {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, SubjectKey>> {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn keys(&self, subjects: &[String]) -> Result<Vec<(String, SubjectKey)>, StoreError> {
        let keys = self.locked();
        Ok(subjects
            .iter()
            .filter_map(|subject| Some((subject.clone(), keys.get(subject)?.clone())))
            .collect())
    }

    async fn create(&self, subject: &str, key: SecretKey) -> Result<SubjectKey, StoreError> {
        Ok(self
            .locked()
            .entry(subject.to_owned())
            .or_insert(SubjectKey::Active(key))
            .clone())
    }

    async fn forget(&self, subject: &str) -> Result<bool, StoreError> {
        let previous = self
            .locked()
            .insert(subject.to_owned(), SubjectKey::Forgotten);
        Ok(!matches!(previous, Some(SubjectKey::Forgotten)))
    }
}
