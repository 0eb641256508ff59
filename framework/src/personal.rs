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
//! let name = Personal::of("user-1", "Ann Lindqvist".to_owned());
//!
//! // Stored, the field is ciphertext under user-1's key...
//! let sealed = keys.seal(&name).await?;
//! assert!(!sealed.to_string().contains("Lindqvist"));
//! let opened: Personal<String> = keys.open(&sealed).await?;
//! assert_eq!(opened.value().map(String::as_str), Some("Ann Lindqvist"));
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
pub(crate) use ring::{in_scope, open_stored, prepare_in_scope, seal_text, sealing, CopyKeysError};
pub use seal::Personal;

/// The aggregate type of the streams erasures are recorded in: forgetting
/// subject `s` appends a `SubjectForgotten` event (payload
/// `{"subject": s}`, nothing else) to stream `outflow.subject`/`s`.
pub const ERASURE_STREAM: &str = "outflow.subject";

/// The event type of a recorded erasure.
pub const ERASURE_EVENT: &str = "SubjectForgotten";

/// Whether `value` holds a sealed personal value.
pub(crate) fn holds_sealed(value: &serde_json::Value) -> bool {
    let mut subjects = Vec::new();
    seal::subjects_in(value, &mut subjects);
    !subjects.is_empty()
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Profile {
        name: Personal<String>,
        age: Personal<u32>,
        plan: String,
    }

    fn ring() -> KeyRing {
        KeyRing::new(MemoryKeyStore::new())
    }

    fn profile(subject: &str) -> Profile {
        Profile {
            name: Personal::of(subject, "Annabelle Quux".to_owned()),
            age: Personal::of(subject, 98_765_432),
            plan: "gold".into(),
        }
    }

    #[tokio::test]
    async fn seals_each_field_and_opens_it_again() {
        let keys = ring();
        let sealed = keys.seal(&profile("u-1")).await.expect("seal");
        let text = sealed.to_string();
        assert!(
            !text.contains("Annabelle") && !text.contains("98765432"),
            "{text}"
        );
        assert_eq!(sealed["plan"], "gold");
        assert_eq!(sealed["name"]["$personal"]["s"], "u-1");
        // A fresh nonce each time: equal values seal differently.
        assert_ne!(
            sealed["name"],
            keys.seal(&profile("u-1")).await.expect("seal")["name"]
        );
        let opened: Profile = keys.open(&sealed).await.expect("open");
        assert_eq!(opened, profile("u-1"));
        assert_eq!(opened.name.subject(), Some("u-1"));
    }

    #[tokio::test]
    async fn a_ciphertext_moved_to_another_subject_does_not_open() {
        let keys = ring();
        let mut sealed = keys.seal(&profile("u-1")).await.expect("seal");
        keys.seal(&profile("u-2")).await.expect("a key for u-2");
        sealed["name"]["$personal"]["s"] = json!("u-2");
        let error = keys
            .open::<Profile>(&sealed)
            .await
            .expect_err("bound to its subject");
        assert!(error.to_string().contains("does not decrypt"), "{error}");
    }

    #[tokio::test]
    async fn forgotten_values_read_as_forgotten_and_write_as_marks() {
        let keys = ring();
        let sealed = keys.seal(&profile("u-1")).await.expect("seal");
        assert!(keys.forget("u-1").await.expect("forget"));
        let opened: Profile = keys.open(&sealed).await.expect("open");
        assert!(opened.name.is_forgotten() && opened.age.is_forgotten());
        assert_eq!(opened.name.subject(), Some("u-1"));
        assert_eq!(opened.plan, "gold");
        // Written again: a mark, no ciphertext, and no new key made.
        let again = keys.seal(&opened).await.expect("seal");
        assert_eq!(
            again["name"],
            json!({ "$personal": { "s": "u-1", "forgotten": true } })
        );
        let fresh = keys.seal(&profile("u-1")).await.expect("seal");
        assert_eq!(fresh["age"]["$personal"]["forgotten"], true);
        // A subject whose key never existed reads as forgotten too.
        let elsewhere: Profile = ring().open(&sealed).await.expect("open");
        assert!(elsewhere.name.is_forgotten());
    }

    #[tokio::test]
    async fn plain_values_are_read_and_serialized_outside_a_scope() {
        // Written before the field was marked, or an API's input.
        let plain = json!({ "name": "Bo", "age": 7, "plan": "basic" });
        let read: Profile = serde_json::from_value(plain.clone()).expect("plain");
        assert_eq!(read.name.value().map(String::as_str), Some("Bo"));
        assert_eq!(read.name.subject(), None);
        assert_eq!(serde_json::to_value(&read).expect("plain"), plain);
        // Forgotten, outside a scope: null, and null reads back forgotten.
        let forgotten = Profile {
            name: Personal::forgotten("u-1"),
            age: Personal::forgotten("u-1"),
            plan: "basic".into(),
        };
        let value = serde_json::to_value(&forgotten).expect("serialize");
        assert_eq!(value["name"], serde_json::Value::Null);
        let back: Profile = serde_json::from_value(value).expect("null");
        assert!(back.name.is_forgotten());
    }

    #[tokio::test]
    async fn sealed_values_need_a_scope_and_values_need_a_subject() {
        let keys = ring();
        let sealed = keys.seal(&profile("u-1")).await.expect("seal");
        let outside = serde_json::from_value::<Profile>(sealed).expect_err("no scope");
        assert!(
            outside.to_string().contains("outside a key scope"),
            "{outside}"
        );
        let nameless = Profile {
            name: Personal::new("Ann".into()),
            age: Personal::of("u-1", 1),
            plan: String::new(),
        };
        let error = keys.seal(&nameless).await.expect_err("no subject");
        assert!(
            crate::error::error_chain(&error).contains("without a subject"),
            "{error}"
        );
        let error = sealing(None, Some("u-1"), true, || serde_json::to_value(&nameless))
            .await
            .expect("no key store to read")
            .expect_err("no key store");
        assert!(error.to_string().contains("without a key store"), "{error}");
    }

    #[tokio::test]
    async fn a_batch_opens_with_the_keys_loaded_for_it_however_old() {
        let keys = ring().cache_for(std::time::Duration::ZERO);
        let sealed = keys.seal(&profile("u-1")).await.expect("seal");
        keys.prepare_values([&sealed]).await.expect("prepare");
        // Older than the ring's cache time (and its one-second floor): a
        // retrying read would fetch the key again, a batch uses it as is.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        let opened = keys
            .scope(async { serde_json::from_value::<Profile>(sealed.clone()) })
            .await
            .expect("opened");
        assert_eq!(opened, profile("u-1"));
    }

    #[test]
    fn subjects_are_found_in_stored_text_in_any_key_order() {
        let mut found = Vec::new();
        seal::subjects_in_text(
            r#"{"a": {"$personal": {"c": "x}y", "k": 1, "n": "z", "s": "u-1"}}, "b": [{"$personal":{"s":"u \"2\"","k":1}}], "p": 3}"#,
            &mut found,
        );
        assert_eq!(found, ["u-1", "u \"2\""]);
        let mut found = Vec::new();
        seal::subjects_in_text(r#"{"plain": "$personal"}"#, &mut found);
        assert!(found.is_empty());
    }

    #[test]
    fn debug_never_prints_the_value() {
        let profile = profile("u-1");
        let printed = format!("{profile:?} {:?}", SecretKey::generate());
        assert!(
            !printed.contains("Annabelle") && !printed.contains("98765432"),
            "{printed}"
        );
        assert_eq!(format!("{}", profile.name), "Annabelle Quux");
        assert_eq!(
            format!("{}", Personal::<String>::forgotten("u")),
            "(forgotten)"
        );
    }
}
