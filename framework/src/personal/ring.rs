//! [`KeyRing`]: a [`KeyStore`] with a cache, and the key scopes personal
//! values are sealed and opened in.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::key_store::{KeyStore, SecretKey, SubjectKey};
use super::seal::{subjects_in, subjects_in_text};
use crate::error::StoreError;
use crate::event::RecordedEvent;

/// How long a key read from the key store is used before it is read again,
/// by default: a subject forgotten by another process is read as forgotten
/// here at most this long after.
const DEFAULT_CACHE_FOR: Duration = Duration::from_secs(30);

/// How many subjects' keys a ring keeps before it drops those older than
/// its cache time.
const DEFAULT_CAPACITY: usize = 100_000;

/// How many times a value is sealed or opened again after fetching the keys
/// it found missing (a value names its subjects only as it is written).
const ATTEMPTS: usize = 4;

/// A [`KeyStore`] and a cache of the keys read from it: what seals and
/// opens personal values.
///
/// Every `PostgresStore`, `SqliteStore` and [`MemoryStore`](crate::MemoryStore)
/// has one over its own keys (`store.key_ring()`); a `JetStreamStore` is
/// given one (`with_key_ring`). Clones share the cache.
///
/// A key read from the store is used for [`cache_for`](Self::cache_for)
/// (30 s by default) and then read again, so a subject forgotten through
/// another process's ring reads as forgotten here within that time; one
/// forgotten through this ring does at once.
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn KeyStore>,
    cache: Mutex<HashMap<String, Cached>>,
    cache_for: Duration,
    capacity: usize,
}

#[derive(Clone)]
enum State {
    Active(Arc<SecretKey>),
    Forgotten,
    /// Neither a key nor an erasure: a reader reads forgotten, a writer
    /// creates the key.
    Absent,
}

struct Cached {
    state: State,
    at: Instant,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("cached", &self.locked().len())
            .field("cache_for", &self.inner.cache_for)
            .finish_non_exhaustive()
    }
}

/// What a scope finds for a subject.
pub(crate) enum Lookup {
    Active(Arc<SecretKey>),
    Forgotten,
    /// Not loaded (or loaded too long ago): fetch it and try again.
    Missing,
    /// The scope's store has no key store.
    NoKeys,
}

/// What personal values are sealed and opened with on this task: the ring,
/// the subject of a value that names none (the stream's), and the subjects
/// whose keys were missing.
#[derive(Clone)]
pub(crate) struct Scope {
    ring: Option<KeyRing>,
    default_subject: Option<Arc<str>>,
    missing: Arc<Mutex<Vec<String>>>,
    /// Whether whoever set the scope up fetches missing keys and tries
    /// again (otherwise a missing key is an error at once).
    retries: bool,
}

tokio::task_local! {
    static SCOPE: Scope;
}

impl Scope {
    fn new(ring: Option<KeyRing>, default_subject: Option<&str>, retries: bool) -> Self {
        Scope {
            ring,
            default_subject: default_subject.map(Arc::from),
            missing: Arc::default(),
            retries,
        }
    }

    /// Whether a missing key is fetched and the value written again.
    pub(crate) fn retries(&self) -> bool {
        self.retries
    }

    pub(crate) fn default_subject(&self) -> Option<&str> {
        self.default_subject.as_deref()
    }

    pub(crate) fn lookup(&self, subject: &str, write: bool) -> Lookup {
        match &self.ring {
            None => Lookup::NoKeys,
            // A scope that cannot fetch keys again (a batch's) uses what was
            // loaded for it, however long its handler takes.
            Some(ring) => ring.lookup(subject, write, !self.retries),
        }
    }

    pub(crate) fn note_missing(&self, subject: &str) {
        self.missing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(subject.to_owned());
    }

    fn take_missing(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .missing
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

/// Calls `f` with the task's key scope, if it has one.
pub(crate) fn with_scope<R>(f: impl FnOnce(Option<&Scope>) -> R) -> R {
    let scope = SCOPE.try_with(Scope::clone).ok();
    f(scope.as_ref())
}

/// The ring of the task's key scope: `None` outside a scope,
/// `Some(None)` in a scope over a store without keys.
pub(crate) fn current_ring() -> Option<Option<KeyRing>> {
    SCOPE.try_with(|scope| scope.ring.clone()).ok()
}

/// Reads stored JSON `texts` with `f` (which deserializes them), their
/// sealed values opened with `ring` after one read of the keys they name.
///
/// # Errors
///
/// The key store's; `f`'s own result otherwise.
pub(crate) async fn open_stored<'a, R, E>(
    ring: Option<&KeyRing>,
    texts: impl IntoIterator<Item = &'a str>,
    f: impl FnMut() -> Result<R, E>,
) -> Result<Result<R, E>, StoreError> {
    if let Some(ring) = ring {
        ring.prepare_texts(texts).await?;
    }
    sealing(ring, None, false, f).await
}

/// Serializes `value` to JSON text as stored, in the task's key scope
/// (outside one: plain), fetching missing keys.
pub(crate) async fn seal_text<T: Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    let text = match current_ring() {
        None => serde_json::to_string(value),
        Some(ring) => sealing(ring.as_ref(), None, true, || serde_json::to_string(value)).await?,
    };
    text.map_err(|source| StoreError::Serialize {
        what: "document",
        aggregate_type: String::new(),
        aggregate_id: String::new(),
        source,
    })
}

/// Loads the keys of the sealed values in `texts` into the task's key
/// scope's ring, if any.
pub(crate) async fn prepare_in_scope<'a>(
    texts: impl IntoIterator<Item = &'a str>,
) -> Result<(), StoreError> {
    match current_ring() {
        Some(Some(ring)) => ring.prepare_texts(texts).await,
        _ => Ok(()),
    }
}

/// Runs `future` in a key scope over `ring` (none: personal values fail,
/// naming the missing key store).
pub(crate) async fn in_scope<F: Future>(ring: Option<KeyRing>, future: F) -> F::Output {
    SCOPE.scope(Scope::new(ring, None, false), future).await
}

/// Runs `f` (which serializes or deserializes) in a key scope over `ring`,
/// with `default_subject` for values that name none; when it met keys that
/// were not loaded, loads them (creating those of new subjects when
/// `create`) and runs it again.
///
/// # Errors
///
/// The key store's, when loading keys fails; `f`'s own result otherwise.
pub(crate) async fn sealing<R, E>(
    ring: Option<&KeyRing>,
    default_subject: Option<&str>,
    create: bool,
    mut f: impl FnMut() -> Result<R, E>,
) -> Result<Result<R, E>, StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let scope = Scope::new(ring.cloned(), default_subject, true);
        let result = SCOPE.sync_scope(scope.clone(), &mut f);
        let missing = scope.take_missing();
        match ring {
            Some(ring) if !missing.is_empty() => {
                if attempt >= ATTEMPTS {
                    // Never hand back what was written with placeholders.
                    return Err(StoreError::Unsupported {
                        what: "sealing personal data",
                        reason: "the subjects' keys could not be kept loaded (the key ring's \
                                 cache keeps dropping them: raise its capacity or cache time)",
                    });
                }
                ring.load(missing, create).await?;
            }
            _ => return Ok(result),
        }
    }
}

impl KeyRing {
    /// A ring over `store`, caching each key for 30 s.
    pub fn new(store: impl KeyStore) -> Self {
        KeyRing {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                cache: Mutex::default(),
                cache_for: DEFAULT_CACHE_FOR,
                capacity: DEFAULT_CAPACITY,
            }),
        }
    }

    /// How long a key read from the store is used before it is read again
    /// (default 30 s): the longest a subject forgotten through another
    /// process stays readable here. With `Duration::ZERO` every batch of
    /// values reads its keys again (a key just read serves its batch for
    /// up to a second).
    pub fn cache_for(self, cache_for: Duration) -> Self {
        KeyRing {
            inner: Arc::new(Inner {
                store: self.inner.store.clone(),
                cache: Mutex::default(),
                cache_for,
                capacity: self.inner.capacity,
            }),
        }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lookup(&self, subject: &str, write: bool, any_age: bool) -> Lookup {
        let cache = self.locked();
        let Some(cached) = cache.get(subject) else {
            return Lookup::Missing;
        };
        // A key just loaded for this batch is used even with a zero cache time.
        let fresh =
            any_age || cached.at.elapsed() <= self.inner.cache_for.max(Duration::from_secs(1));
        match (&cached.state, fresh) {
            (_, false) => Lookup::Missing,
            (State::Active(key), true) => Lookup::Active(key.clone()),
            (State::Forgotten, true) => Lookup::Forgotten,
            (State::Absent, true) if write => Lookup::Missing,
            (State::Absent, true) => Lookup::Forgotten,
        }
    }

    fn remember(&self, found: impl IntoIterator<Item = (String, State)>) {
        let mut cache = self.locked();
        let now = Instant::now();
        for (subject, state) in found {
            cache.insert(subject, Cached { state, at: now });
        }
        if cache.len() > self.inner.capacity {
            let cache_for = self.inner.cache_for;
            cache.retain(|_, cached| cached.at.elapsed() <= cache_for);
        }
    }

    /// Loads the keys of `subjects` not cached (or cached too long ago);
    /// when `create`, makes keys for those that have none.
    async fn load(&self, mut subjects: Vec<String>, create: bool) -> Result<(), StoreError> {
        subjects.sort_unstable();
        subjects.dedup();
        subjects.retain(|subject| matches!(self.lookup(subject, create, false), Lookup::Missing));
        if subjects.is_empty() {
            return Ok(());
        }
        let found = self.inner.store.keys(&subjects).await?;
        let mut states: HashMap<String, State> = subjects
            .iter()
            .map(|subject| (subject.clone(), State::Absent))
            .collect();
        for (subject, key) in found {
            states.insert(subject, state_of(key));
        }
        if create {
            for (subject, state) in states.iter_mut() {
                if matches!(state, State::Absent) {
                    let made = self
                        .inner
                        .store
                        .create(subject, SecretKey::generate())
                        .await?;
                    *state = state_of(made);
                }
            }
        }
        self.remember(states);
        Ok(())
    }

    /// Loads the keys the personal values in `events`' payloads need, so
    /// that they open in [`scope`](Self::scope) (the projection runner and
    /// the command bus do this themselves).
    ///
    /// # Errors
    ///
    /// The key store's.
    pub async fn prepare(&self, events: &[RecordedEvent]) -> Result<(), StoreError> {
        let mut subjects = Vec::new();
        for event in events {
            subjects_in(&event.payload, &mut subjects);
        }
        self.load(subjects, false).await
    }

    /// As [`prepare`](Self::prepare), for stored JSON values (a snapshot).
    pub(crate) async fn prepare_values<'a>(
        &self,
        values: impl IntoIterator<Item = &'a serde_json::Value>,
    ) -> Result<(), StoreError> {
        let mut subjects = Vec::new();
        for value in values {
            subjects_in(value, &mut subjects);
        }
        self.load(subjects, false).await
    }

    /// As [`prepare`](Self::prepare), for stored JSON texts (a view's rows,
    /// a stream's events).
    pub(crate) async fn prepare_texts<'a>(
        &self,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), StoreError> {
        let mut subjects = Vec::new();
        for text in texts {
            subjects_in_text(text, &mut subjects);
        }
        self.load(subjects, false).await
    }

    /// Runs `future` in a key scope over this ring: personal values
    /// serialized in it are sealed, and sealed ones deserialized in it are
    /// opened with the keys [`prepare`](Self::prepare) loaded.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// # use outflow::doc_fixture::{Counter, CounterCommand};
    /// use outflow::prelude::*;
    ///
    /// let store = MemoryStore::new();
    /// let bus = CommandBus::<Counter, _>::new(store.clone(), ());
    /// bus.execute("c-1", CounterCommand::Increment { by: 1 }).await?;
    /// let events = store.read_log(Checkpoint::START, &LogFilter::all(), 10).await?;
    /// let keys = store.key_ring();
    /// keys.prepare(&events).await?;
    /// let decoded = keys
    ///     .scope(async { events[0].decode_ref::<Counter>(&[]) })
    ///     .await?;
    /// assert_eq!(decoded.sequence, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn scope<F: Future>(&self, future: F) -> F::Output {
        in_scope(Some(self.clone()), future).await
    }

    /// Gives `to` the keys of the subjects whose sealed values `events`
    /// hold, as this ring's store keeps them (a copy of a log to another
    /// store). A subject forgotten here is left without a key there, which
    /// reads as forgotten.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when `to` keeps another key for a subject
    /// (its events would not open); either store's errors.
    pub(crate) async fn copy_keys(
        &self,
        to: &KeyRing,
        events: &[RecordedEvent],
    ) -> Result<(), CopyKeysError> {
        let mut subjects = Vec::new();
        for event in events {
            subjects_in(&event.payload, &mut subjects);
        }
        subjects.sort_unstable();
        subjects.dedup();
        if subjects.is_empty() {
            return Ok(());
        }
        let kept = self
            .inner
            .store
            .keys(&subjects)
            .await
            .map_err(CopyKeysError::Source)?;
        for (subject, key) in kept {
            let SubjectKey::Active(key) = key else {
                continue;
            };
            let copied = key.clone();
            match to
                .inner
                .store
                .create(&subject, key)
                .await
                .map_err(CopyKeysError::Target)?
            {
                SubjectKey::Active(there) if there.bytes() != copied.bytes() => {
                    return Err(CopyKeysError::Target(StoreError::Corrupt {
                        table: "keys".to_owned(),
                        what: format!(
                            "the target keeps another key for subject `{subject}`: its copied \
                             values would not open"
                        ),
                    }))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Forgets `subject`: deletes its key from the key store (which records
    /// the erasure), so every sealed value of the subject, wherever it was
    /// copied, reads as forgotten from now on; values written for it later
    /// are stored forgotten. Returns `false` when the subject was forgotten
    /// before (forgetting is idempotent).
    ///
    /// # Errors
    ///
    /// The key store's; nothing is forgotten then.
    pub async fn forget(&self, subject: &str) -> Result<bool, StoreError> {
        let forgotten = self.inner.store.forget(subject).await?;
        self.remember([(subject.to_owned(), State::Forgotten)]);
        Ok(forgotten)
    }

    /// Drops what this ring cached of `subject` (the next value reads the
    /// key store), for a process told that another one forgot it.
    pub fn evict(&self, subject: &str) {
        self.locked().remove(subject);
    }

    /// Serializes `value` as it would be stored: personal values sealed
    /// (those that name no subject fail: there is no stream here).
    ///
    /// # Errors
    ///
    /// [`StoreError::Serialize`] when it does not serialize; the key
    /// store's.
    pub async fn seal<T: Serialize>(&self, value: &T) -> Result<serde_json::Value, StoreError> {
        sealing(Some(self), None, true, || serde_json::to_value(value))
            .await?
            .map_err(|source| StoreError::Serialize {
                what: "personal value",
                aggregate_type: String::new(),
                aggregate_id: String::new(),
                source,
            })
    }

    /// Deserializes `value` as stored, opening its sealed personal values.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] when it does not deserialize; the key
    /// store's.
    pub async fn open<T: DeserializeOwned>(
        &self,
        value: &serde_json::Value,
    ) -> Result<T, StoreError> {
        sealing(Some(self), None, false, || T::deserialize(value))
            .await?
            .map_err(|e| StoreError::Corrupt {
                table: "personal value".to_owned(),
                what: e.to_string(),
            })
    }
}

/// Which side of a copy of keys failed.
#[derive(Debug)]
pub(crate) enum CopyKeysError {
    Source(StoreError),
    Target(StoreError),
}

fn state_of(key: SubjectKey) -> State {
    match key {
        SubjectKey::Active(key) => State::Active(Arc::new(key)),
        SubjectKey::Forgotten => State::Forgotten,
    }
}
