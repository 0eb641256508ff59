//! The port of decisions across aggregates: reading the events that match a
//! [`Query`], and appending on condition that no event matching a query was
//! appended after what was read.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::event::{AppendRequest, Checkpoint, RecordedEvent};
use crate::port::events::AppendInTransaction;
use crate::tags::Query;

/// Where a read by query stood: an append conditional on it fails when an
/// event matching the condition's query was appended that the read did not
/// see.
///
/// From [`ConditionalAppend::read_query`] it names exactly what the read saw
/// (on PostgreSQL the read's snapshot: an event committed late, by a
/// transaction that was still open during the read, is not seen and
/// therefore conflicts). [`ReadPosition::after`] builds one from a
/// checkpoint of the [global log](crate::log): everything up to it counts
/// as seen — right for a position reached by reading the log, whose reader
/// never passes an event that commits late.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReadPosition {
    checkpoint: Checkpoint,
    snapshot: Option<String>,
}

impl ReadPosition {
    /// Everything in the log up to `checkpoint` (in log order) counts as
    /// read.
    ///
    /// ```
    /// use outflow::Checkpoint;
    /// use outflow::store::ReadPosition;
    /// let read = ReadPosition::after(Checkpoint::new(7, 10));
    /// assert_eq!(read.checkpoint(), Checkpoint::new(7, 10));
    /// ```
    pub fn after(checkpoint: Checkpoint) -> Self {
        ReadPosition {
            checkpoint,
            snapshot: None,
        }
    }

    /// A position from a backend's read: the last matching event's
    /// checkpoint and what the backend needs to know what the read saw (on
    /// PostgreSQL the read's snapshot, on SQLite the log's head).
    pub(crate) fn read(checkpoint: Checkpoint, snapshot: Option<String>) -> Self {
        ReadPosition {
            checkpoint,
            snapshot,
        }
    }

    /// The checkpoint of the last matching event read ([`Checkpoint::START`]
    /// when none matched), or the one given to [`after`](Self::after).
    pub fn checkpoint(&self) -> Checkpoint {
        self.checkpoint
    }

    /// What the backend recorded of the read, as text, when it came from one.
    pub(crate) fn snapshot(&self) -> Option<&str> {
        self.snapshot.as_deref()
    }
}

/// What [`ConditionalAppend::read_query`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRead {
    /// The matching events, in log order.
    pub events: Vec<RecordedEvent>,
    /// What the read saw, for [`AppendCondition::new`].
    pub position: ReadPosition,
    /// The version of the stream named in the read (0 when it has no
    /// event, or when no stream was named), read with the events.
    pub stream_version: u64,
}

/// An append's condition: no event matching `query` appended after `after`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppendCondition {
    /// The events that must not have changed.
    pub query: Query,
    /// What the writer read.
    pub after: ReadPosition,
}

impl AppendCondition {
    /// No event matching `query` after `after`.
    pub fn new(query: Query, after: ReadPosition) -> Self {
        AppendCondition { query, after }
    }
}

/// A backend that stores events with tags, reads them by [`Query`], and
/// appends on a condition — atomically, against every concurrent writer,
/// including one whose transaction commits late (PostgreSQL and SQLite;
/// the in-memory store for tests). A JetStream store does not implement it:
/// see [`JetStreamStore::conditional_appends`](crate::JetStreamStore::conditional_appends).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use outflow::tags::{Query, QueryItem};
/// use outflow::store::{AppendCondition, ConditionalAppend};
/// use outflow::{AppendRequest, MemoryStore, NewEvent};
/// let store = MemoryStore::new();
/// let query = Query::new().with(QueryItem::tags(["email:ann@example.com"]));
/// let read = store.read_query(&query, None).await?;
/// assert!(read.events.is_empty());
/// let event = NewEvent::new("UserSignedUp", serde_json::json!({"email": "ann@example.com"}));
/// let request = AppendRequest::new("user", "u-1", 0, vec![event.clone()]);
/// let tags = vec![vec!["email:ann@example.com".to_owned()]];
/// let condition = AppendCondition::new(query.clone(), read.position.clone());
/// store.append_if(request, tags.clone(), Some(condition.clone())).await?;
/// // A second sign-up decided on the same read is refused.
/// let again = AppendRequest::new("user", "u-2", 0, vec![event]);
/// let refused = store.append_if(again, tags, Some(condition)).await.unwrap_err();
/// assert!(refused.is_conflict());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait ConditionalAppend: AppendInTransaction {
    /// The events matching `query`, in log order, with what the read saw;
    /// with `stream` (`(aggregate type, aggregate id)`), that stream's
    /// version read at the same moment.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidQuery`]; [`StoreError::Database`].
    async fn read_query(
        &self,
        query: &Query,
        stream: Option<(&str, &str)>,
    ) -> Result<QueryRead, StoreError>;

    /// Appends `request` inside `tx`, each event carrying its tags
    /// (`tags[i]` for `request.events[i]`; missing entries are no tags)
    /// and its stream's tag; with `condition`, only if no event matching
    /// its query was appended after its position.
    ///
    /// # Errors
    ///
    /// [`StoreError::ConditionFailed`] (retryable: read again and decide
    /// again); as [`AppendInTransaction::append_in`];
    /// [`StoreError::InvalidQuery`] for bad tags.
    async fn append_tagged_in(
        &self,
        tx: &mut Self::Transaction,
        request: AppendRequest,
        tags: Vec<Vec<String>>,
        condition: Option<&AppendCondition>,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// [`append_tagged_in`](Self::append_tagged_in), then
    /// [`claim_command_in`](AppendInTransaction::claim_command_in) of
    /// `command_id` at the version the append reaches, in `tx`: what a
    /// decision commits. A backend may send both as one statement (the
    /// default runs them one after the other).
    ///
    /// # Errors
    ///
    /// As [`append_tagged_in`](Self::append_tagged_in), and
    /// [`StoreError::Conflict`] when an outcome for `command_id` is already
    /// stored (the caller drops the transaction).
    async fn append_tagged_claiming_in(
        &self,
        tx: &mut Self::Transaction,
        request: AppendRequest,
        tags: Vec<Vec<String>>,
        condition: Option<&AppendCondition>,
        command_id: uuid::Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        append_then_claim(self, tx, request, tags, condition, command_id).await
    }

    /// Adds tags to events already in the log (`(checkpoint, tags)`: the
    /// event at that checkpoint gets those tags; tags it already has are
    /// kept once; a checkpoint with no event is skipped); returns how many
    /// tags were new. What
    /// [`backfill_tags`](crate::decision::backfill_tags) calls, for events
    /// appended before their aggregate's bus tagged its events. Each tag's
    /// shared lock is taken as for an append.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidQuery`] for bad tags; [`StoreError::Database`].
    async fn tag_existing(&self, tags: &[(Checkpoint, Vec<String>)]) -> Result<u64, StoreError>;

    /// [`append_tagged_in`](Self::append_tagged_in) in a transaction of its
    /// own.
    ///
    /// # Errors
    ///
    /// As [`append_tagged_in`](Self::append_tagged_in).
    async fn append_if(
        &self,
        request: AppendRequest,
        tags: Vec<Vec<String>>,
        condition: Option<AppendCondition>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut tx = self.begin().await?;
        let written = self
            .append_tagged_in(&mut tx, request, tags, condition.as_ref())
            .await?;
        self.commit(tx).await?;
        Ok(written)
    }
}

/// Each event's tags with its stream's tag, normalized: what every backend
/// stores.
pub(crate) fn event_tags(
    request: &AppendRequest,
    mut tags: Vec<Vec<String>>,
) -> Result<Vec<Vec<String>>, StoreError> {
    tags.resize(request.events.len(), Vec::new());
    tags.truncate(request.events.len());
    let stream = crate::tags::stream_tag(&request.aggregate_type, &request.aggregate_id);
    tags.into_iter()
        .map(|mut list| {
            list.push(stream.clone());
            crate::tags::normalized_tags(list).map_err(|reason| StoreError::InvalidQuery { reason })
        })
        .collect()
}

/// [`ConditionalAppend::append_tagged_claiming_in`] as two calls: the
/// append, then the claim at the version it reaches (the default, and what
/// a backend that folds them falls back on).
pub(crate) async fn append_then_claim<S: ConditionalAppend + ?Sized>(
    store: &S,
    tx: &mut S::Transaction,
    request: AppendRequest,
    tags: Vec<Vec<String>>,
    condition: Option<&AppendCondition>,
    command_id: uuid::Uuid,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let version = request.expected_version + request.events.len() as u64;
    let (aggregate_type, aggregate_id) =
        (request.aggregate_type.clone(), request.aggregate_id.clone());
    let written = store.append_tagged_in(tx, request, tags, condition).await?;
    store
        .claim_command_in(tx, &aggregate_type, &aggregate_id, command_id, version)
        .await?;
    Ok(written)
}
