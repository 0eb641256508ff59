//! Errors of the event store, of command execution and of handlers.
//!
//! Every failure names what went wrong and with which input: the event (type,
//! version, aggregate, sequence, position), the table, the operation. Whether
//! a failure is worth retrying is decided by the backend that raised it
//! ([`ErrorKind`]): the core never looks at a driver's error codes.
//!
//! This module is the bottom floor of the crate: it names no other module.

use std::fmt;

/// A boxed error from a storage backend, kept as the source of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whose fault a failure is, as the backend that raised it classifies it.
/// Long-running loops (projection runners, relays) decide with it whether to
/// retry, wait, or blame the event.
///
/// ```
/// use outflow::error::ErrorKind;
/// assert!(ErrorKind::Transient.is_retryable());
/// assert!(!ErrorKind::Infrastructure.is_events_fault());
/// assert!(ErrorKind::Data.is_events_fault());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Passes by itself: a lost connection, a server restarting, a
    /// serialization failure or deadlock, a busy database file, a pool
    /// exhausted. Retry soon, with backoff.
    Transient,
    /// The environment is wrong and someone must fix it: a missing table or
    /// column, a permission, a syntax error in the handler's SQL, bad
    /// configuration. Never the event's fault: wait with backoff and say so
    /// in status, never park the event for it.
    Infrastructure,
    /// The data is at fault: a payload that does not decode, a constraint the
    /// event's effect violates. Retrying the same event will not help; the
    /// event may be parked.
    Data,
}

impl ErrorKind {
    /// `true` for [`ErrorKind::Transient`].
    pub fn is_retryable(self) -> bool {
        self == ErrorKind::Transient
    }

    /// `true` for [`ErrorKind::Data`]: only then may an event be parked.
    pub fn is_events_fault(self) -> bool {
        self == ErrorKind::Data
    }

    /// A short name (`transient`, `infrastructure`, `data`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Infrastructure => "infrastructure",
            ErrorKind::Data => "data",
        }
    }

    /// The kind [`as_str`](Self::as_str) names, if `name` is one.
    ///
    /// ```
    /// use outflow::ErrorKind;
    /// assert_eq!(ErrorKind::from_name("infrastructure"), Some(ErrorKind::Infrastructure));
    /// assert_eq!(ErrorKind::from_name("nonsense"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        [
            ErrorKind::Transient,
            ErrorKind::Infrastructure,
            ErrorKind::Data,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one stored event in error messages: which aggregate, which sequence,
/// where in the global log, of which type and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    /// Aggregate type (`Aggregate::TYPE`).
    pub aggregate_type: String,
    /// Aggregate instance id.
    pub aggregate_id: String,
    /// Sequence number within the aggregate's stream (1-based).
    pub sequence: u64,
    /// Global position, when the event was read from the log.
    pub position: Option<u64>,
    /// Event type as stored.
    pub event_type: String,
    /// Event version as stored.
    pub event_version: String,
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event `{}` v{} of {} `{}` #{}",
            self.event_type,
            self.event_version,
            self.aggregate_type,
            self.aggregate_id,
            self.sequence
        )?;
        if let Some(position) = self.position {
            write!(f, " at position {position}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in an event store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Optimistic concurrency: another writer appended to the stream first.
    /// Reload and retry the command.
    #[error(
        "concurrency conflict on {aggregate_type} `{aggregate_id}`: expected version {expected}{}",
        match .actual { Some(actual) => format!(", stream is at version {actual}"), None => String::new() }
    )]
    Conflict {
        /// Aggregate type of the stream.
        aggregate_type: String,
        /// Aggregate id of the stream.
        aggregate_id: String,
        /// The version the caller loaded.
        expected: u64,
        /// The version found, when known.
        actual: Option<u64>,
    },
    /// The append ran in a transaction that is older than the one that last
    /// appended to this stream (the caller wrote other rows first, and another
    /// transaction appended and committed meanwhile). Appending would put the
    /// stream out of order in the global log; retry in a new transaction.
    #[error(
        "stream {aggregate_type} `{aggregate_id}` was last appended by a transaction newer than \
         the caller's; retry the whole transaction"
    )]
    StaleTransaction {
        /// Aggregate type of the stream.
        aggregate_type: String,
        /// Aggregate id of the stream.
        aggregate_id: String,
    },
    /// A configured name is not a valid SQL identifier.
    #[error("invalid {what} `{name}`: {reason}")]
    InvalidIdentifier {
        /// What the name was for (events table, snapshots table, ...).
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// An append request that cannot be written (empty aggregate id, too many events, ...).
    #[error("invalid append to {aggregate_type} `{aggregate_id}`: {reason}")]
    InvalidAppend {
        /// Aggregate type of the stream.
        aggregate_type: String,
        /// Aggregate id of the stream.
        aggregate_id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Configuration that is invalid, or contradicts what is stored (for
    /// example a projection registered with another partition count).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A stored payload or metadata did not deserialize into the event type.
    #[error("{event} did not deserialize")]
    Deserialize {
        /// The event.
        event: Box<EventRef>,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored row whose payload or metadata is not JSON that Outflow can
    /// read (the database accepted what `serde_json` refuses: a lone
    /// surrogate escape, a number out of range, nesting deeper than 128, a
    /// metadata value that is not a string). The log treats it as a poison
    /// event: a projection parks it or stops on it, per its policy, and
    /// handles the events around it.
    #[error("the {what} of {event} (event {event_id}) does not decode")]
    Undecodable {
        /// The event.
        event: Box<EventRef>,
        /// The event's id.
        event_id: uuid::Uuid,
        /// The id of the transaction that wrote it (with
        /// [`EventRef::position`], its place in the global log).
        transaction_id: u64,
        /// `"payload"` or `"metadata"`.
        what: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored event type is not a variant of the aggregate's event enum.
    #[error("{event} has an event type the aggregate does not know")]
    UnknownEventType {
        /// The event.
        event: Box<EventRef>,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// An upcaster failed (or panicked) on a stored event.
    #[error("upcaster `{upcaster}` failed on {event}: {message}")]
    Upcast {
        /// The event, as it was before the failing upcaster.
        event: Box<EventRef>,
        /// The upcaster's name.
        upcaster: String,
        /// What it reported.
        message: String,
    },
    /// An event or aggregate did not serialize to JSON.
    #[error("{what} of {aggregate_type} `{aggregate_id}` did not serialize")]
    Serialize {
        /// What was serialized (event payload, snapshot, metadata).
        what: &'static str,
        /// Aggregate type.
        aggregate_type: String,
        /// Aggregate id.
        aggregate_id: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored value is outside what Outflow can represent (a negative
    /// sequence, an unparsable transaction id).
    #[error("corrupt row in {table}: {what}")]
    Corrupt {
        /// The table.
        table: String,
        /// What is wrong.
        what: String,
    },
    /// A schema migration failed.
    #[error("migration {version} ({name}) failed")]
    Migration {
        /// Migration version.
        version: i32,
        /// Migration name.
        name: &'static str,
        /// The database error.
        #[source]
        source: BoxError,
    },
    /// The store's servers did not answer in time: no leader for the
    /// stream (a majority of its replicas is down, or an election is under
    /// way) or no connection. Transient: retry with backoff. An append that
    /// failed so may still have been stored (retry it with the same command
    /// id: [`CommandBus::execute_once`](crate::CommandBus::execute_once)).
    #[error("{operation} failed: the event store is unavailable")]
    Unavailable {
        /// What Outflow was doing.
        operation: &'static str,
        /// What the client reported.
        #[source]
        source: BoxError,
    },
    /// The database reported an error or the connection failed.
    #[error("{operation} failed ({kind} error)")]
    Database {
        /// What Outflow was doing.
        operation: &'static str,
        /// Whose fault it is, as the backend classified it.
        kind: ErrorKind,
        /// The backend error.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Whose fault the error is: concurrency conflicts are
    /// [transient](ErrorKind::Transient); events that do not decode or
    /// upcast are the [data's](ErrorKind::Data); configuration, names and
    /// migrations are the [infrastructure's](ErrorKind::Infrastructure);
    /// database errors carry the backend's own classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Conflict { .. }
            | StoreError::StaleTransaction { .. }
            | StoreError::Unavailable { .. } => ErrorKind::Transient,
            StoreError::Database { kind, .. } => *kind,
            StoreError::InvalidIdentifier { .. }
            | StoreError::Config(_)
            | StoreError::Migration { .. } => ErrorKind::Infrastructure,
            StoreError::InvalidAppend { .. }
            | StoreError::Deserialize { .. }
            | StoreError::Undecodable { .. }
            | StoreError::UnknownEventType { .. }
            | StoreError::Upcast { .. }
            | StoreError::Serialize { .. }
            | StoreError::Corrupt { .. } => ErrorKind::Data,
        }
    }

    /// `true` for errors that a fresh attempt may not meet: a concurrency
    /// conflict, a stale transaction, or a lost connection.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// `true` when another writer appended to the stream first.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict { .. } | StoreError::StaleTransaction { .. }
        )
    }

    /// `true` when the store's servers did not answer in time
    /// ([`StoreError::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// A database error with the backend's classification.
    pub fn database(operation: &'static str, kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        StoreError::Database {
            operation,
            kind,
            source: source.into(),
        }
    }
}

/// Configuration that is invalid or contradicts what is stored: reported at
/// start-up (or by the call that met it), never retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A projection (or relay) is stored with another partition count than
    /// configured; the count cannot be changed in place (run it under a new
    /// name).
    #[error(
        "`{name}` is stored with {stored} partition(s) but configured with {configured}; \
         use a new projection name to change the count"
    )]
    PartitionCount {
        /// The projection or relay.
        name: String,
        /// The counts found in the store.
        stored: String,
        /// The count configured.
        configured: u32,
    },
    /// Two projections (or relays) of one runner have the same name.
    #[error("`{0}` is registered twice")]
    DuplicateName(String),
    /// A name that must not be empty is.
    #[error("{0} has an empty name")]
    EmptyName(&'static str),
    /// No projection of that name belongs to this runner.
    #[error("no projection `{0}` in this runner")]
    UnknownProjection(String),
    /// A setting is out of its range.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A table Outflow needs does not exist (its migrations were not applied).
    #[error("the table `{table}` does not exist: {hint}")]
    MissingTable {
        /// The table.
        table: String,
        /// How to create it.
        hint: &'static str,
    },
    /// Something that may run once per process is running already.
    #[error("`{0}` is running already")]
    AlreadyRunning(String),
    /// A projection's setup hook failed, so it was not started (or not
    /// rebuilt).
    #[error("the setup hook of `{name}` failed: {error}")]
    SetupHook {
        /// The projection.
        name: String,
        /// The hook's error.
        error: HandlerError,
    },
    /// A projection's reset hook failed, so its rebuild was not started.
    #[error("the reset hook of `{name}` failed: {error}")]
    ResetHook {
        /// The projection.
        name: String,
        /// The hook's error.
        error: HandlerError,
    },
}

/// The error of [`CommandBus::execute`](crate::CommandBus::execute): the
/// aggregate refused the command (now, or when the same command id was sent
/// before), or storing its events failed.
///
/// A refusal displays the domain error's own message, as cqrs-es's
/// `AggregateError::UserError` does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate's `handle` returned an error; nothing was written.
    /// [`execute_once`](crate::CommandBus::execute_once) remembers it, and
    /// a bus with [typed refusals](crate::CommandBusBuilder::remember_typed_refusals)
    /// answers a re-send with the same error decoded.
    #[error(transparent)]
    Rejected(E),
    /// The command id was refused when it was first sent, and
    /// [`execute_once`](crate::CommandBus::execute_once) returns that
    /// refusal again without running the command (see [`crate::outcome`]).
    /// On a bus with typed refusals this comes only for a refusal whose
    /// stored JSON no longer decodes.
    #[error(transparent)]
    Refused(crate::outcome::Refusal),
    /// Loading or appending failed; see [`StoreError::is_conflict`] for
    /// concurrency conflicts.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An inline handler failed; the events and its writes were rolled back.
    #[error("inline handler `{handler}` failed: {error}")]
    Inline {
        /// The handler's name.
        handler: String,
        /// Its error.
        error: HandlerError,
    },
}

impl<E: std::error::Error + 'static> CommandError<E> {
    /// `true` when the command lost an optimistic-concurrency race and may be retried.
    pub fn is_conflict(&self) -> bool {
        matches!(self, CommandError::Store(e) if e.is_conflict())
    }

    /// The aggregate's own error, when the command was rejected now (or a
    /// remembered refusal was decoded).
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            CommandError::Refused(_) | CommandError::Store(_) | CommandError::Inline { .. } => None,
        }
    }

    /// `true` when the aggregate refused the command, now or when the same
    /// command id was sent before ([`Rejected`](Self::Rejected) or
    /// [`Refused`](Self::Refused)): a business outcome, not a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(self, CommandError::Rejected(_) | CommandError::Refused(_))
    }

    /// The refusal's message, for [`Rejected`](Self::Rejected) and
    /// [`Refused`](Self::Refused) alike.
    pub fn refusal_message(&self) -> Option<String> {
        match self {
            CommandError::Rejected(e) => Some(e.to_string()),
            CommandError::Refused(refusal) => Some(refusal.message.clone()),
            CommandError::Store(_) | CommandError::Inline { .. } => None,
        }
    }
}

/// The error of a handler (projection, inline handler, message handler): any
/// error, with its chain of causes, and optionally a classification.
///
/// `?` converts any error into it inside handlers: every
/// `std::error::Error + Send + Sync` (sqlx, serde, Outflow's own),
/// `anyhow::Error`, `Box<dyn Error + Send + Sync>`, and plain messages. Out
/// of a handler, `?` turns it into `anyhow::Error` or `Box<dyn Error>`, and
/// [`into_error`](Self::into_error) into `Box<dyn Error + Send + Sync>`; the
/// causes are kept either way.
///
/// ```
/// use outflow::error::HandlerError;
///
/// fn with_anyhow() -> Result<(), HandlerError> {
///     Err(anyhow::anyhow!("remote said no"))?;
///     Ok(())
/// }
/// fn with_box() -> Result<(), HandlerError> {
///     let boxed: Box<dyn std::error::Error + Send + Sync> = "bad amount".into();
///     Err(boxed)?;
///     Ok(())
/// }
/// fn caller() -> anyhow::Result<()> {
///     with_anyhow()?;
///     Ok(())
/// }
/// assert_eq!(with_box().unwrap_err().to_string(), "bad amount");
/// assert_eq!(caller().unwrap_err().to_string(), "remote said no");
/// ```
///
/// Whose fault a failure is decides what the runner does: the backend that
/// ran the handler's transaction classifies its own errors (a missing table
/// is the infrastructure's, a lost connection is transient), and a handler
/// can say so itself with [`transient`](Self::transient) or
/// [`infrastructure`](Self::infrastructure). Only errors left as the data's
/// fault may get an event parked.
///
/// ```
/// use outflow::error::{ErrorKind, HandlerError};
/// let e = HandlerError::msg("amount is negative");
/// assert_eq!(e.declared_kind(), None);
/// let e = HandlerError::transient(std::io::Error::other("broker down"));
/// assert_eq!(e.declared_kind(), Some(ErrorKind::Transient));
/// assert_eq!(e.to_string(), "broker down");
/// ```
pub struct HandlerError {
    source: BoxError,
    kind: Option<ErrorKind>,
}

impl HandlerError {
    /// Wraps any boxed error (an `anyhow::Error` converts with `.into()`).
    pub fn new(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            kind: None,
        }
    }

    /// An error with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        HandlerError {
            source: message.into().into(),
            kind: None,
        }
    }

    /// An error the handler marks as passing by itself (a broker that is
    /// down, an acknowledgement that timed out): the runner retries the batch
    /// with backoff for as long as it takes, never parks its events, and never
    /// moves the checkpoint past them.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            kind: Some(ErrorKind::Transient),
        }
    }

    /// An error the handler marks as the environment's (a service it needs
    /// is misconfigured): like [`transient`](Self::transient), the events are
    /// never parked for it, and the status shows it until it is fixed.
    pub fn infrastructure(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            kind: Some(ErrorKind::Infrastructure),
        }
    }

    /// An error the handler marks as the event's fault.
    pub fn data(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            kind: Some(ErrorKind::Data),
        }
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Turns it back into the boxed error it wraps (without the kind).
    pub fn into_inner(self) -> BoxError {
        self.source
    }

    /// Turns it into a boxed `std::error::Error` whose causes are the
    /// wrapped error's: for functions that return
    /// `Box<dyn Error + Send + Sync>`. (`?` converts it into `anyhow::Error`
    /// and `Box<dyn Error>` directly.)
    pub fn into_error(self) -> BoxError {
        Box::new(HandlerErrorChain(self))
    }

    /// The error and its causes, outermost first, joined with `: `.
    pub fn chain(&self) -> String {
        error_chain(&*self.source)
    }

    /// The classification the handler gave, or that an Outflow error in the
    /// chain carries; `None` when only the backend can tell (see
    /// [`kind_with`](Self::kind_with)).
    pub fn declared_kind(&self) -> Option<ErrorKind> {
        if self.kind.is_some() {
            return self.kind;
        }
        causes(&*self.source)
            .find_map(|error| error.downcast_ref::<StoreError>())
            .map(StoreError::kind)
    }

    /// The classification: the handler's own, else an Outflow error's in the
    /// chain, else what `classify` (the backend) says of any error in the
    /// chain, else [`ErrorKind::Data`].
    pub fn kind_with(
        &self,
        classify: impl Fn(&(dyn std::error::Error + 'static)) -> Option<ErrorKind>,
    ) -> ErrorKind {
        self.declared_kind()
            .or_else(|| causes(&*self.source).find_map(classify))
            .unwrap_or(ErrorKind::Data)
    }

    /// `true` when the handler or an Outflow error in the chain says the
    /// failure passes by itself.
    pub fn is_transient(&self) -> bool {
        self.declared_kind() == Some(ErrorKind::Transient)
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    /// Any error converts: `std::error::Error` types, `anyhow::Error`,
    /// `Box<dyn Error + Send + Sync>`, and messages (`String`, `&str`).
    fn from(error: E) -> Self {
        HandlerError {
            source: error.into(),
            kind: None,
        }
    }
}

impl From<HandlerError> for anyhow::Error {
    fn from(error: HandlerError) -> Self {
        anyhow::Error::from_boxed(error.into_error())
    }
}

impl From<HandlerError> for Box<dyn std::error::Error + 'static> {
    fn from(error: HandlerError) -> Self {
        error.into_error()
    }
}

/// [`HandlerError`] as a `std::error::Error`, for `?` into
/// `Box<dyn Error + Send + Sync>` and `anyhow::Error`.
#[derive(Debug)]
struct HandlerErrorChain(HandlerError);

impl fmt::Display for HandlerErrorChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.source, f)
    }
}

impl std::error::Error for HandlerErrorChain {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source.source()
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandlerError({})", self.chain())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.chain())
    }
}

/// An error and its causes, outermost first.
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |error| error.source())
}

/// An error and its causes, outermost first, joined with `: `: how Outflow
/// writes errors into logs and status.
///
/// Outflow's errors follow one convention: `Display` is the error's own
/// message, and the cause comes from [`source`](std::error::Error::source),
/// so every message appears once (also with `anyhow`'s `{:#}`). A cause
/// whose text its wrapper already ends with (some drivers print their cause
/// as well) is not repeated.
///
/// ```
/// use outflow::error::{error_chain, ErrorKind, StoreError};
/// let error = StoreError::database(
///     "appending events",
///     ErrorKind::Transient,
///     std::io::Error::other("connection reset"),
/// );
/// assert_eq!(error.to_string(), "appending events failed (transient error)");
/// assert_eq!(
///     error_chain(&error),
///     "appending events failed (transient error): connection reset"
/// );
/// ```
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    for cause in causes(error) {
        let next = cause.to_string();
        if text.is_empty() {
            text = next;
        } else if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
    }
    text
}
