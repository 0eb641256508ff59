//! The outbox's port: what a backend does so that messages enqueued in the
//! application's own SQL transaction reach a relay, in order, at least once.
//!
//! The invariant a backend keeps: [`OutboxTable::read`] serves messages in
//! one delivery order (a [`Checkpoint`] per message) and never serves a
//! message while one that comes before it in that order may still commit. On
//! PostgreSQL the order is `(transaction id, id)` and reads stop at the
//! oldest transaction still in flight; SQLite has one writer at a time, so
//! its row ids are already commit order. The feature
//! ([`crate::outbox`]) holds everything else: validation, the relay, its
//! lease and cursor (kept by the store's [`Checkpoints`]), retries, status.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::Checkpoint;
use crate::port::projections::{Checkpoints, Leases};

/// Longest message key or topic, in bytes (keys are indexed).
pub const MAX_KEY_LEN: usize = 1024;

/// A message to enqueue.
///
/// ```
/// use outflow::outbox::OutboxMessage;
/// let message = OutboxMessage::new("user-42", "users.signed_up", serde_json::json!({ "id": 42 }))
///     .header("content-type", "application/json");
/// assert_eq!(message.headers["content-type"], "application/json");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// A stable id, unique per message (default: a new UUID v7). Brokers and
    /// consumers deduplicate redeliveries by it; set it yourself to make a
    /// retried business operation produce the same id.
    pub message_id: Uuid,
    /// The ordering key: messages of one key are delivered in enqueue order.
    /// Typically the id of the entity the message is about. Not empty.
    pub key: String,
    /// Where the message goes (a broker subject, a handler's name). Not empty.
    pub topic: String,
    /// The body, delivered exactly as given.
    pub payload: Value,
    /// Headers, delivered exactly as given.
    pub headers: BTreeMap<String, String>,
}

impl Default for OutboxMessage {
    /// An empty message with a new id (key and topic must still be set).
    fn default() -> Self {
        OutboxMessage {
            message_id: Uuid::now_v7(),
            key: String::new(),
            topic: String::new(),
            payload: Value::Null,
            headers: BTreeMap::new(),
        }
    }
}

impl OutboxMessage {
    /// A message with a new id and no headers.
    pub fn new(key: impl Into<String>, topic: impl Into<String>, payload: Value) -> Self {
        OutboxMessage {
            key: key.into(),
            topic: topic.into(),
            payload,
            ..OutboxMessage::default()
        }
    }

    /// Adds (or replaces) a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the message id.
    pub fn with_message_id(mut self, message_id: Uuid) -> Self {
        self.message_id = message_id;
        self
    }
}

/// A message as stored, handed to an [`OutboxSink`](crate::outbox::OutboxSink).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessageRecord {
    /// Its row id in the outbox table (the second part of its place in
    /// delivery order).
    pub id: u64,
    /// Id of the transaction that enqueued it (the first part of its place).
    pub transaction_id: u64,
    /// The stable message id: use it as the broker's deduplication id
    /// (e.g. `Nats-Msg-Id`) and as the consumer's idempotency key.
    pub message_id: Uuid,
    /// The ordering key.
    pub key: String,
    /// The topic.
    pub topic: String,
    /// The body.
    pub payload: Value,
    /// The headers.
    pub headers: BTreeMap<String, String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
}

impl OutboxMessageRecord {
    /// Its place in delivery order.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(self.transaction_id, self.id)
    }
}

/// What [`OutboxStore::open_outbox`] is asked for.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OutboxSettings {
    /// The events table the outbox belongs to (`None`: the store's own); the
    /// outbox table is `<events table>_outbox`.
    pub events_table: Option<String>,
    /// Whether a wake-up also reaches relays on other nodes at once, where
    /// the backend can signal them (PostgreSQL's `NOTIFY`).
    pub notify_other_nodes: bool,
    /// The least time between two such signals from one handle.
    pub notify_interval: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        OutboxSettings {
            events_table: None,
            notify_other_nodes: true,
            notify_interval: Duration::from_millis(5),
        }
    }
}

impl OutboxSettings {
    /// The outbox table for a store whose events table is `store_events`:
    /// `<events table>_outbox`, refused when the settings name another
    /// events table (a SQL backend's check, the same on each).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn outbox_table(
        &self,
        store_events: &str,
    ) -> Result<crate::names::Identifier, StoreError> {
        let name = self.events_table.as_deref().unwrap_or(store_events);
        let events = crate::names::Identifier::parse(name, "events table")?;
        if name != store_events {
            return Err(crate::error::ConfigError::Invalid {
                setting: "outbox events table",
                reason: format!(
                    "the outbox was given the events table `{events}`, which is not the store's \
                     (`{store_events}`)"
                ),
            }
            .into());
        }
        events.derived("outbox", "outbox table")
    }
}

/// Committed messages not yet delivered, as [`OutboxTable::pending`] counts
/// them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pending {
    /// How many (up to the cap asked for).
    pub count: u64,
    /// How long ago the oldest was enqueued, by the database's clock.
    pub oldest_age: Option<Duration>,
}

/// A backend that keeps a transactional outbox beside its events:
/// `PostgresStore` and `SqliteStore`. The relay keeps its lease and cursor
/// through the store's [`Checkpoints`].
#[async_trait]
pub trait OutboxStore: Checkpoints + Leases + std::fmt::Debug {
    /// The SQL database whose transactions messages are enqueued in.
    type Database: sqlx::Database;
    /// This backend's outbox of one events table.
    type Outbox: OutboxTable<Self>;

    /// Opens the outbox: checks that the events table is the store's and
    /// that the outbox table exists, and starts whatever signals other
    /// nodes.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] for a bad name,
    /// [`StoreError::Config`] for another store's events table or a missing
    /// outbox table (migrations not applied), [`StoreError::Database`].
    async fn open_outbox(&self, settings: &OutboxSettings) -> Result<Self::Outbox, StoreError>;
}

/// One outbox table of a backend, its statements prepared. Every method but
/// `enqueue` and `mark_delivered` runs on its own connection.
#[async_trait]
pub trait OutboxTable<S: OutboxStore>: std::fmt::Debug + Send + Sync + 'static {
    /// The outbox table's name (`<events table>_outbox`).
    fn table(&self) -> &str;

    /// The channel other nodes are signalled on; empty where the backend has
    /// none (its relays poll).
    fn channel(&self) -> &str;

    /// A write transaction of its own (for a message sent alone).
    async fn begin(&self) -> Result<sqlx::Transaction<'static, S::Database>, StoreError>;

    /// Commits a caller's transaction that enqueued messages.
    async fn commit(&self, tx: sqlx::Transaction<'_, S::Database>) -> Result<(), StoreError>;

    /// Inserts `message` (its headers already serialized to JSON) in the
    /// caller's transaction. `false` when it would overtake a committed
    /// message of its key (the caller retries its whole transaction).
    async fn enqueue(
        &self,
        connection: &mut <S::Database as sqlx::Database>::Connection,
        message: &OutboxMessage,
        headers: &str,
    ) -> Result<bool, StoreError>;

    /// Up to `limit` committed, undelivered messages after `after`, in
    /// delivery order; none whose place an uncommitted message could still
    /// precede.
    async fn read(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<OutboxMessageRecord>, StoreError>;

    /// Whether undelivered messages lie after `after` although a read found
    /// none (they wait behind a transaction in flight).
    async fn held_back(&self, after: Checkpoint) -> Result<bool, StoreError>;

    /// Undelivered messages after `after`, counted up to `cap`.
    async fn pending(&self, after: Checkpoint, cap: u64) -> Result<Pending, StoreError>;

    /// Marks messages delivered inside the relay's checkpoint transaction.
    async fn mark_delivered(&self, tx: &mut S::Transaction, ids: &[u64]) -> Result<(), StoreError>;

    /// Deletes delivered messages older than `retention` among the first
    /// `limit` in delivery order; how many.
    async fn cleanup_batch(&self, retention: Duration, limit: u64) -> Result<u64, StoreError>;

    /// After a logical restore into another database server: when stored
    /// places are ahead of what the server will hand out, moves every
    /// message back (keeping the order) and returns how many; `None` when
    /// nothing was ahead. The caller resets the relay's cursor in the same
    /// transaction.
    async fn rebase(&self, tx: &mut S::Transaction) -> Result<Option<u64>, StoreError>;

    /// Signals relays on other nodes (coalesced; never inside a
    /// transaction). Does nothing where the backend cannot.
    fn notify_others(&self);

    /// Calls `wake` on every signal from another node, and once each time
    /// it (re)connects, until `stop`. Returns at once where the backend has
    /// no signals.
    async fn listen(&self, wake: &(dyn Fn() + Send + Sync), stop: &CancellationToken);
}
