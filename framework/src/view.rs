//! Runs any `cqrs-es` [`View`] as a durable projection, in PostgreSQL or
//! SQLite.
//!
//! Rows have the layout of `postgres-es`'s view tables — `view_id text`,
//! `version bigint`, `payload json` — and the same contents its
//! `GenericQuery` would write: the view's JSON, and as version the number of
//! commands applied to it. So a `cqrs-es` view moves to Outflow unchanged,
//! and becomes durable and rebuildable. The runner creates the table when it
//! starts (the projection's setup hook); [`ViewProjection::query`] gives the
//! query side a handle to read the views, with read-your-writes.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cqrs_es::{Aggregate, View};

use crate::error::StoreError;
use crate::event::{Checkpoint, Envelope, RecordedEvent};
use crate::names::Identifier;

use crate::projection::HandlerError;
use crate::runner::WaitError;

pub use crate::port::views::ViewStore;

type KeyFn<A> = dyn Fn(&Envelope<A>) -> Option<String> + Send + Sync;

/// A `cqrs-es` view kept in a table by the projection runner, on
/// PostgreSQL ([`PostgresStore`](crate::PostgresStore)) or SQLite
/// (`SqliteStore`).
///
/// ```no_run
/// # use outflow::doc_fixture::{Counter, CounterEvent};
/// use cqrs_es::{EventEnvelope, View};
/// use outflow::projection::ProjectionOptions;
/// use outflow::view::ViewProjection;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// struct CounterView { total: i64 }
///
/// impl View<Counter> for CounterView {
///     fn update(&mut self, event: &EventEnvelope<Counter>) {
///         let CounterEvent::Incremented { by } = event.payload;
///         self.total += by;
///     }
/// }
///
/// # fn demo() -> Result<(), outflow::StoreError> {
/// let view = ViewProjection::<Counter, CounterView>::new("counter_view", "counter_view")?;
/// let options: ProjectionOptions<outflow::PostgresStore> = ProjectionOptions::new(view);
/// # Ok(()) }
/// ```
pub struct ViewProjection<A: Aggregate, V> {
    name: String,
    /// The table, quoted for SQL.
    pub(crate) table: String,
    key: Arc<KeyFn<A>>,
    upcasters: crate::upcast::Upcasters,
    _view: PhantomData<fn() -> V>,
}

impl<A: Aggregate, V> std::fmt::Debug for ViewProjection<A, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewProjection")
            .field("name", &self.name)
            .field("table", &self.table)
            .field("aggregate_type", &A::TYPE)
            .field("view", &std::any::type_name::<V>())
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate, V> Clone for ViewProjection<A, V> {
    fn clone(&self) -> Self {
        ViewProjection {
            name: self.name.clone(),
            table: self.table.clone(),
            key: self.key.clone(),
            upcasters: self.upcasters.clone(),
            _view: PhantomData,
        }
    }
}

/// A view as read and written in one batch: key, view, version.
type Row<V> = (String, V, i64);

/// A view while a batch is folded into it: key, view, version, and the
/// last command (aggregate id, transaction id) applied to it.
type Folding<V> = (String, V, i64, Option<(String, u64)>);

impl<A, V> ViewProjection<A, V>
where
    A: Aggregate + 'static,
    V: View<A> + 'static,
{
    /// A view projection named `name` writing to `table` (validated like
    /// every table name), keyed by aggregate id.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] for a bad table name.
    pub fn new(name: impl Into<String>, table: &str) -> Result<Self, StoreError> {
        let table = Identifier::parse(table, "view table")?.quoted();
        Ok(ViewProjection {
            name: name.into(),
            table,
            key: Arc::new(|event: &Envelope<A>| Some(event.aggregate_id.clone())),
            upcasters: crate::upcast::Upcasters::new(),
            _view: PhantomData,
        })
    }

    /// Keys the view by what `key` derives from each event (events for
    /// which it returns `None` are skipped): one view row can then gather
    /// events of many aggregates.
    pub fn keyed_by(
        mut self,
        key: impl Fn(&Envelope<A>) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Arc::new(key);
        self
    }

    /// Upcasters run on each event before it is decoded.
    pub fn with_upcasters(mut self, upcasters: Vec<Box<dyn crate::upcast::Upcaster>>) -> Self {
        self.upcasters = upcasters.into();
        self
    }

    /// Upcasters run on each event before it is decoded: the same
    /// [`Upcasters`](crate::upcast::Upcasters) list (cloned) that the
    /// command bus and the other readers are given.
    pub fn upcasters(mut self, upcasters: crate::upcast::Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// A handle to read this projection's views, to keep in the query side
    /// of an application (an HTTP handler's state) after the projection is
    /// handed to the runner. Cheap to clone.
    ///
    /// ```no_run
    /// # use outflow::doc_fixture::{Counter, CounterCommand, CounterEvent};
    /// # use cqrs_es::{EventEnvelope, View};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Default, Serialize, Deserialize)]
    /// # struct CounterView { total: i64 }
    /// # impl View<Counter> for CounterView {
    /// #     fn update(&mut self, event: &EventEnvelope<Counter>) {
    /// #         let CounterEvent::Incremented { by } = event.payload;
    /// #         self.total += by;
    /// #     }
    /// # }
    /// use std::time::Duration;
    /// use outflow::view::ViewProjection;
    ///
    /// # async fn demo(store: outflow::PostgresStore, bus: outflow::CommandBus<Counter, outflow::PostgresStore>) -> Result<(), Box<dyn std::error::Error>> {
    /// let view = ViewProjection::<Counter, CounterView>::new("counter_view", "counter_view")?;
    /// let query = view.query(&store);
    /// // ... hand `view` to the runner, keep `query` ...
    /// let done = bus.execute("c-1", CounterCommand::Increment { by: 2 }).await?;
    /// // Read-your-writes: waits until the view has this command's events.
    /// let counter = query
    ///     .load_after(done.checkpoint(), "c-1", Duration::from_secs(5))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn query<S: ViewStore>(&self, store: &S) -> ViewQuery<A, V, S> {
        ViewQuery {
            store: store.clone(),
            name: self.name.clone(),
            table: self.table.clone(),
            _types: PhantomData,
        }
    }

    /// Decodes a batch and keys each event; events without a key are
    /// skipped.
    fn keyed(&self, events: &[RecordedEvent]) -> Result<Vec<(String, Envelope<A>)>, HandlerError> {
        let mut decoded = Vec::with_capacity(events.len());
        for event in events {
            let envelope = event.decode_ref::<A>(&self.upcasters)?;
            if let Some(key) = (self.key)(&envelope) {
                decoded.push((key, envelope));
            }
        }
        Ok(decoded)
    }

    /// The distinct keys of a keyed batch, sorted.
    fn keys(decoded: &[(String, Envelope<A>)]) -> Vec<String> {
        let mut keys: Vec<String> = decoded.iter().map(|(k, _)| k.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Applies a keyed batch to the stored views (missing ones start from
    /// `V::default()`), counting versions as `postgres-es` does: once per
    /// command dispatched to a view.
    fn fold(stored: Vec<Row<V>>, decoded: &[(String, Envelope<A>)]) -> Vec<Row<V>> {
        let mut views: Vec<Folding<V>> = stored
            .into_iter()
            .map(|(key, view, version)| (key, view, version, None))
            .collect();
        let mut index_of: HashMap<String, usize> = views
            .iter()
            .enumerate()
            .map(|(i, (key, ..))| (key.clone(), i))
            .collect();
        for (key, envelope) in decoded {
            let index = *index_of.entry(key.clone()).or_insert_with(|| {
                views.push((key.clone(), V::default(), 0, None));
                views.len() - 1
            });
            let (_, view, version, last_command) = &mut views[index];
            // A command's events share aggregate and transaction.
            let command = (envelope.aggregate_id.clone(), envelope.transaction_id);
            if last_command.as_ref() != Some(&command) {
                *version += 1;
                *last_command = Some(command);
            }
            view.update(&envelope.to_cqrs());
        }
        views
            .into_iter()
            .map(|(key, view, version, _)| (key, view, version))
            .collect()
    }
}

#[async_trait]
impl<A, V, S> crate::projection::Projection<S> for ViewProjection<A, V>
where
    A: Aggregate + 'static,
    V: View<A> + 'static,
    S: ViewStore + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> crate::port::log::LogFilter {
        crate::port::log::LogFilter::aggregate_types([A::TYPE])
    }

    /// Reads the batch's views in one statement, folds the events into them
    /// and writes them back.
    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        let decoded = self.keyed(events)?;
        let keys = Self::keys(&decoded);
        if keys.is_empty() {
            return Ok(());
        }
        let read = S::documents_in(tx, &self.table, &keys).await?;
        crate::personal::prepare_in_scope(read.iter().map(|(_, _, payload)| payload.as_str()))
            .await?;
        let mut stored = Vec::new();
        for (id, version, payload) in read {
            stored.push((id, serde_json::from_str::<V>(&payload)?, version));
        }
        let mut documents = Vec::with_capacity(keys.len());
        for (id, view, version) in Self::fold(stored, &decoded) {
            documents.push((id, version, crate::personal::seal_text(&view).await?));
        }
        S::save_documents(tx, &self.table, &documents).await?;
        Ok(())
    }

    /// Creates the view table if it does not exist.
    async fn setup(&self, tx: &mut S::Transaction) -> Result<(), HandlerError> {
        S::create_documents(tx, &self.table).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut S::Transaction) -> Result<(), HandlerError> {
        S::clear_documents(tx, &self.table).await?;
        Ok(())
    }
}

/// Reads the views of a [`ViewProjection`], from anywhere in the
/// application; made by [`ViewProjection::query`].
pub struct ViewQuery<A, V, S> {
    store: S,
    name: String,
    table: String,
    _types: PhantomData<fn() -> (A, V)>,
}

impl<A, V, S: Clone> Clone for ViewQuery<A, V, S> {
    fn clone(&self) -> Self {
        ViewQuery {
            store: self.store.clone(),
            name: self.name.clone(),
            table: self.table.clone(),
            _types: PhantomData,
        }
    }
}

impl<A, V, S> std::fmt::Debug for ViewQuery<A, V, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewQuery")
            .field("projection", &self.name)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<A, V, S> ViewQuery<A, V, S>
where
    A: Aggregate + 'static,
    V: View<A> + 'static,
    S: ViewStore,
{
    /// The projection's name.
    pub fn projection(&self) -> &str {
        &self.name
    }

    /// Reads one view as it is now.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; [`StoreError::Corrupt`] when the stored JSON
    /// does not fit `V`.
    pub async fn load(&self, view_id: &str) -> Result<Option<V>, StoreError> {
        let Some(payload) = self.store.view_payload(&self.table, view_id).await? else {
            return Ok(None);
        };
        let ring = self.store.key_ring();
        crate::personal::open_stored(ring.as_ref(), [payload.as_str()], || {
            serde_json::from_str(&payload)
        })
        .await?
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            table: self.table.clone(),
            what: format!("view `{view_id}` does not deserialize: {e}"),
        })
    }

    /// Reads up to `limit` views in id order, starting after `after` when
    /// given (pass the last id of a page to read the next).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; [`StoreError::Corrupt`] when a stored JSON
    /// does not fit `V`.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, V)>, StoreError> {
        let rows = self.store.view_payloads(&self.table, after, limit).await?;
        let ring = self.store.key_ring();
        let texts = rows.iter().map(|(_, payload)| payload.as_str());
        crate::personal::open_stored(ring.as_ref(), texts, || {
            rows.iter()
                .map(|(id, payload)| {
                    let view = serde_json::from_str(payload).map_err(|e| StoreError::Corrupt {
                        table: self.table.clone(),
                        what: format!("view `{id}` does not deserialize: {e}"),
                    })?;
                    Ok((id.clone(), view))
                })
                .collect()
        })
        .await?
    }

    /// Reads one view once the projection has passed `checkpoint`
    /// (read-your-writes: pass [`Committed::checkpoint`](crate::Committed::checkpoint)
    /// of the command); `None` reads at once. Waits on the checkpoints in
    /// the store, so it works whichever node runs the projection. On a log
    /// ordered per partition (a partitioned JetStream store) wait with
    /// [`ProjectionRunner::wait_for`](crate::runner::ProjectionRunner::wait_for),
    /// which waits for the checkpoint's own partition, and read with `None`.
    ///
    /// # Errors
    ///
    /// As [`wait_for`](crate::runner::wait_for) (a timeout, a parked event,
    /// a stopped or failing projection), and [`WaitError::Store`] when
    /// reading fails.
    pub async fn load_after(
        &self,
        checkpoint: impl Into<Option<Checkpoint>>,
        view_id: &str,
        timeout: Duration,
    ) -> Result<Option<V>, WaitError> {
        if let Some(checkpoint) = checkpoint.into() {
            crate::runner::wait_for(&self.store, checkpoint, &[self.name.as_str()], timeout)
                .await?;
        }
        Ok(self.load(view_id).await?)
    }
}
