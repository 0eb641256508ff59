//! [`Personal<T>`]: a field sealed under its subject's key when stored.

use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::de::{DeserializeOwned, Error as _};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::key_store::SecretKey;
use super::ring::{with_scope, Lookup};

/// The field name that marks a sealed value in stored JSON.
pub(crate) const MARK: &str = "$personal";

/// The key version every ciphertext names today (a subject has one key).
const KEY_VERSION: u32 = 1;

/// A personal field: stored encrypted under its data subject's key, read as
/// plaintext while the key exists and as forgotten once it is deleted.
///
/// Use it for the fields of events, aggregates, views and process states
/// that hold a person's data (a name, an address, a phone number); the
/// rest of the type stays plain. The subject is the id of the person the
/// data is about: a value made with [`Personal::new`] belongs to the stream
/// it is written in (the aggregate id of the event's stream), one made with
/// [`Personal::of`] to the subject it names. A value read back keeps its
/// subject, so copying it into a view or a later event keeps it under the
/// same key.
///
/// Two values are equal when their plaintexts are (a forgotten value equals
/// another forgotten one); the subject does not take part, so a test can
/// compare an event read back with one written by [`Personal::new`].
///
/// ```
/// use outflow::personal::Personal;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum UserEvent {
///     SignedUp { name: Personal<String>, email: Personal<String>, plan: String },
/// }
///
/// let name = Personal::new("Ann".to_owned());
/// assert_eq!(name.value().map(String::as_str), Some("Ann"));
/// assert_eq!(format!("{name:?}"), "Personal(<personal>)");
/// // Outside a key scope (an HTTP response), it is its plain value.
/// assert_eq!(serde_json::to_string(&name)?, "\"Ann\"");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone)]
pub struct Personal<T> {
    subject: Option<String>,
    value: Option<T>,
}

impl<T> Personal<T> {
    /// A personal value of the subject of the stream it is written to: the
    /// aggregate id of the event's (or the snapshot's) stream.
    pub fn new(value: T) -> Self {
        Personal {
            subject: None,
            value: Some(value),
        }
    }

    /// A personal value of `subject` (a user id, say), whatever stream it
    /// is written to.
    pub fn of(subject: impl Into<String>, value: T) -> Self {
        Personal {
            subject: Some(subject.into()),
            value: Some(value),
        }
    }

    /// A value of `subject` that was forgotten.
    pub fn forgotten(subject: impl Into<String>) -> Self {
        Personal {
            subject: Some(subject.into()),
            value: None,
        }
    }

    /// The plaintext, or `None` once the subject was forgotten.
    pub fn value(&self) -> Option<&T> {
        self.value.as_ref()
    }

    /// The plaintext, or `None` once the subject was forgotten.
    pub fn into_value(self) -> Option<T> {
        self.value
    }

    /// The plaintext, or `placeholder` once the subject was forgotten.
    ///
    /// ```
    /// use outflow::personal::Personal;
    /// let name: Personal<String> = Personal::forgotten("user-1");
    /// assert_eq!(name.value_or(&"(forgotten)".to_owned()), "(forgotten)");
    /// ```
    pub fn value_or<'a>(&'a self, placeholder: &'a T) -> &'a T {
        self.value.as_ref().unwrap_or(placeholder)
    }

    /// Whether the subject was forgotten (the value is gone).
    pub fn is_forgotten(&self) -> bool {
        self.value.is_none()
    }

    /// The subject this value belongs to, when it names one (a value made
    /// with [`Personal::new`] takes its stream's when written).
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }
}

impl<T> From<T> for Personal<T> {
    fn from(value: T) -> Self {
        Personal::new(value)
    }
}

impl<T: Default> Default for Personal<T> {
    fn default() -> Self {
        Personal::new(T::default())
    }
}

impl<T: PartialEq> PartialEq for Personal<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for Personal<T> {}

/// The plaintext, or `(forgotten)`.
impl<T: std::fmt::Display> std::fmt::Display for Personal<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(value) => value.fmt(f),
            None => f.write_str("(forgotten)"),
        }
    }
}

impl<T> std::fmt::Debug for Personal<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.value {
            Some(_) => f.write_str("Personal(<personal>)"),
            None => f.write_str("Personal(<forgotten>)"),
        }
    }
}

/// A sealed value as stored: the subject, the key's version, the nonce and
/// the ciphertext (base64), or the mark of a forgotten value.
#[derive(Serialize, Deserialize)]
struct Sealed {
    s: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    forgotten: bool,
}

#[derive(Serialize)]
struct Marked<'a> {
    #[serde(rename = "$personal")]
    sealed: &'a Sealed,
}

fn forgotten_mark(subject: &str) -> Sealed {
    Sealed {
        s: subject.to_owned(),
        k: None,
        n: None,
        c: None,
        forgotten: true,
    }
}

fn encrypt(key: &SecretKey, subject: &str, plaintext: &[u8]) -> Result<Sealed, String> {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key.bytes()));
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: subject.as_bytes(),
            },
        )
        .map_err(|_| format!("personal data of subject `{subject}` does not encrypt"))?;
    Ok(Sealed {
        s: subject.to_owned(),
        k: Some(KEY_VERSION),
        n: Some(B64.encode(nonce)),
        c: Some(B64.encode(ciphertext)),
        forgotten: false,
    })
}

fn decrypt(key: &SecretKey, sealed: &Sealed) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let subject = &sealed.s;
    let broken = |what: &str| format!("personal data of subject `{subject}`: {what}");
    if sealed.k.unwrap_or(KEY_VERSION) != KEY_VERSION {
        return Err(broken("sealed under an unknown key version"));
    }
    let nonce = B64
        .decode(sealed.n.as_deref().unwrap_or_default())
        .map_err(|_| broken("the nonce is not base64"))?;
    if nonce.len() != 24 {
        return Err(broken("the nonce is not 24 bytes"));
    }
    let ciphertext = B64
        .decode(sealed.c.as_deref().unwrap_or_default())
        .map_err(|_| broken("the ciphertext is not base64"))?;
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key.bytes()));
    cipher
        .decrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &ciphertext,
                aad: subject.as_bytes(),
            },
        )
        .map(zeroize::Zeroizing::new)
        .map_err(|_| broken("does not decrypt with the subject's key (altered, or another key)"))
}

impl<T: Serialize> Serialize for Personal<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let sealed = with_scope(|scope| {
            let scope = scope?;
            let subject =
                match self.subject.as_deref().or(scope.default_subject()) {
                    Some(subject) => subject.to_owned(),
                    None => return Some(Err(
                        "a personal value without a subject, written where no stream names one: \
                         make it with `Personal::of(subject, value)`"
                            .to_owned(),
                    )),
                };
            let Some(value) = &self.value else {
                return Some(Ok(Some(forgotten_mark(&subject))));
            };
            Some(match scope.lookup(&subject, true) {
                Lookup::Active(key) => serde_json::to_vec(value)
                    .map_err(|e| e.to_string())
                    .map(zeroize::Zeroizing::new)
                    .and_then(|plain| encrypt(&key, &subject, &plain))
                    .map(Some),
                Lookup::Forgotten => Ok(Some(forgotten_mark(&subject))),
                Lookup::Missing if scope.retries() => {
                    scope.note_missing(&subject);
                    Ok(None)
                }
                Lookup::Missing => Err(format!(
                    "the key of subject `{subject}` is not loaded in this key scope"
                )),
                Lookup::NoKeys => Err(format!(
                    "personal data of subject `{subject}` written to a store without a key \
                     store: give the store one (see `outflow::personal`)"
                )),
            })
        });
        match sealed {
            // Outside a key scope: the plain value (`null` once forgotten).
            None => self.value.serialize(serializer),
            Some(Err(message)) => Err(S::Error::custom(message)),
            Some(Ok(Some(sealed))) => Marked { sealed: &sealed }.serialize(serializer),
            // The key is fetched and the value written again.
            Some(Ok(None)) => serializer.serialize_unit(),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Personal<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(deserializer)?;
        let marked = match &mut value {
            serde_json::Value::Object(map) if map.len() == 1 => map.remove(MARK),
            _ => None,
        };
        let Some(marked) = marked else {
            // Plain: a field written before it was marked personal, or an
            // API's input.
            let null = value.is_null();
            return match T::deserialize(value) {
                Ok(plain) => Ok(Personal::new(plain)),
                // `null`: a forgotten value written outside a key scope.
                Err(_) if null => Ok(Personal {
                    subject: None,
                    value: None,
                }),
                Err(error) => Err(D::Error::custom(error)),
            };
        };
        let sealed: Sealed = serde_json::from_value(marked).map_err(D::Error::custom)?;
        if sealed.forgotten {
            return Ok(Personal::forgotten(sealed.s));
        }
        let opened = with_scope(|scope| {
            let Some(scope) = scope else {
                return Err(format!(
                    "personal data of subject `{}` read outside a key scope: read it through \
                     the store's key ring (`KeyRing::scope` after `KeyRing::prepare`)",
                    sealed.s
                ));
            };
            match scope.lookup(&sealed.s, false) {
                Lookup::Active(key) => {
                    let plain = decrypt(&key, &sealed)?;
                    serde_json::from_slice::<T>(&plain)
                        .map(Some)
                        .map_err(|e| e.to_string())
                }
                Lookup::Forgotten => Ok(None),
                Lookup::Missing => {
                    scope.note_missing(&sealed.s);
                    Err(format!(
                        "the key of subject `{}` is not loaded in this scope",
                        sealed.s
                    ))
                }
                Lookup::NoKeys => Err(format!(
                    "personal data of subject `{}` read from a store without a key store",
                    sealed.s
                )),
            }
        })
        .map_err(D::Error::custom)?;
        Ok(Personal {
            subject: Some(sealed.s),
            value: opened,
        })
    }
}

/// The subjects of the sealed values in `value`, appended to `into`.
pub(crate) fn subjects_in(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if map.len() == 1 {
                if let Some(serde_json::Value::Object(sealed)) = map.get(MARK) {
                    if let Some(serde_json::Value::String(subject)) = sealed.get("s") {
                        into.push(subject.clone());
                    }
                    return;
                }
            }
            for inner in map.values() {
                subjects_in(inner, into);
            }
        }
        serde_json::Value::Array(items) => {
            for inner in items {
                subjects_in(inner, into);
            }
        }
        _ => {}
    }
}

/// The subjects of the sealed values in JSON text, found without parsing
/// the whole text: after each `"$personal"`, the string value of its `"s"`
/// (in whatever order the database printed the object's keys). Text it
/// cannot read that way is parsed whole.
pub(crate) fn subjects_in_text(text: &str, into: &mut Vec<String>) {
    let mark = "\"$personal\"";
    let mut rest = text;
    while let Some(at) = rest.find(mark) {
        rest = &rest[at + mark.len()..];
        let Some(subject) = sealed_subject(rest) else {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
                subjects_in(&value, into);
            }
            return;
        };
        into.push(subject);
    }
}

/// The subject of the sealed object that starts `text` (after its mark):
/// `: {"k": 1, "s": "u-1", ...}`. `None` when it does not look like one.
fn sealed_subject(text: &str) -> Option<String> {
    let object = text.trim_start().strip_prefix(':')?.trim_start();
    let object = object.strip_prefix('{')?;
    // Key by key, each value read as JSON, until `s`.
    let mut at = object;
    loop {
        at = at.trim_start();
        let key_end = at.strip_prefix('"')?.find('"')? + 1;
        let key = &at[1..key_end];
        at = at[key_end + 1..]
            .trim_start()
            .strip_prefix(':')?
            .trim_start();
        let mut values = serde_json::Deserializer::from_str(at).into_iter::<serde_json::Value>();
        let value = values.next()?.ok()?;
        let used = values.byte_offset();
        if key == "s" {
            return value.as_str().map(str::to_owned);
        }
        at = at[used..].trim_start();
        at = at.strip_prefix(',')?;
    }
}
