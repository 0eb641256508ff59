//! Personal data in an append-only log: fields encrypted with a key per data
//! subject, so that a person can be forgotten by deleting one key
//! (crypto-shredding).
//!
//! Mark a field personal by giving it the type [`Personal<T>`]. Everything
//! that stores it — events, snapshots, views, process managers' states —
//! writes it encrypted with its **subject's** key: a
//! [`Personal::new`] value belongs to the stream it is written to (its
//! aggregate id), [`Personal::of`] names another subject (a user id in an
//! order's events, say). Aggregates, projections and views read the
//! plaintext as long as the key exists. [`KeyRing::forget`] deletes the key:
//! from then on every copy of that subject's fields — in the log, in
//! snapshots, in backups taken since, in messages relayed to a broker —
//! reads as forgotten ([`Personal::value`] is `None`), never as an error.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use outflow::personal::Personal;
//! use outflow::MemoryStore;
//!
//! let store = MemoryStore::new();
//! let keys = store.key_ring();
//! let name = Personal::of("user-1", "Ann".to_owned());
//!
//! // Stored, the field is ciphertext under user-1's key...
//! let sealed = keys.seal(&name).await?;
//! assert!(!sealed.to_string().contains("Ann"));
//! let opened: Personal<String> = keys.open(&sealed).await?;
//! assert_eq!(opened.value().map(String::as_str), Some("Ann"));
//!
//! // ...and once user-1 is forgotten, it reads as forgotten.
//! keys.forget("user-1").await?;
//! let opened: Personal<String> = keys.open(&sealed).await?;
//! assert!(opened.is_forgotten());
//! # Ok::<(), outflow::StoreError>(())
//! # }).unwrap();
//! ```
//!
//! # How it is stored
//!
//! A personal field is stored as
//! `{"$personal": {"s": <subject>, "k": 1, "n": <nonce>, "c": <ciphertext>}}`:
//! the field's JSON encrypted with XChaCha20-Poly1305 (authenticated, a random
//! 192-bit nonce per field, the subject as associated data, so a ciphertext
//! moved to another subject does not decrypt). A forgotten field written
//! again (a snapshot of an aggregate that read it as forgotten) is stored as
//! `{"$personal": {"s": <subject>, "forgotten": true}}`.
//!
//! Keys are 256-bit, one per subject, created the first time the subject's
//! data is written, and kept by a [`KeyStore`]: `PostgresStore` and
//! `SqliteStore` keep them in a table of their own (`<events table>_keys`),
//! [`MemoryStore`](crate::MemoryStore) in memory; an external store (a KMS,
//! Vault) implements the trait. Keys in memory are zeroized when dropped.
//!
//! # Where the plaintext is
//!
//! Inside Outflow, a `Personal<T>` is encrypted whenever it is written to a
//! store, and decrypted when read, within a *key scope*: the command bus,
//! decisions, the projection runner (its projections' `handle` and
//! `effects`, views, process managers) set one up themselves, with the keys
//! the events they read need. Outside a scope — an HTTP response built from a
//! view, a log line — a `Personal<T>` serializes as its plaintext (`null`
//! once forgotten), so an API can return it as it would the plain field.
//! Code that decodes stored events outside those paths (a subscriber of the
//! in-memory [`EventBus`](crate::pubsub::EventBus), a hand-written reader of
//! the log) opens them in a scope of its own: [`KeyRing::scope`] after
//! [`KeyRing::prepare`].
//!
//! `Debug` never prints a personal value (`Personal(<personal>)`), so
//! a `{:?}` in a log line does not copy it out.

mod key_store;
mod ring;
mod seal;

pub use key_store::{KeyStore, MemoryKeyStore, SecretKey, SubjectKey};
pub use ring::KeyRing;
pub(crate) use ring::{in_scope, prepare_in_scope, seal_text, sealing};
pub use seal::Personal;

/// The aggregate type of the streams erasures are recorded in: forgetting
/// subject `s` appends a `SubjectForgotten` event (payload
/// `{"subject": s}`, nothing else) to stream `outflow.subject`/`s`.
pub const ERASURE_STREAM: &str = "outflow.subject";

/// The event type of a recorded erasure.
pub const ERASURE_EVENT: &str = "SubjectForgotten";

/// The append that records `subject`'s erasure, after `version` (the
/// erasure stream's current version).
pub(crate) fn erasure(subject: &str, version: u64) -> crate::event::AppendRequest {
    crate::event::AppendRequest {
        aggregate_type: ERASURE_STREAM.to_owned(),
        aggregate_id: subject.to_owned(),
        expected_version: version,
        events: vec![crate::event::NewEvent::new(
            ERASURE_EVENT,
            serde_json::json!({ "subject": subject }),
        )],
    }
}
