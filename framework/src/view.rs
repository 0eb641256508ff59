//! Runs any `cqrs-es` [`View`] as a durable projection in PostgreSQL.
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

use async_trait::async_trait;
use cqrs_es::{Aggregate, View};
use sqlx::{PgExecutor, Postgres, Row, Transaction};

use crate::error::StoreError;
use std::time::Duration;

use crate::event::{Checkpoint, Envelope, RecordedEvent};
use crate::log::LogFilter;
use crate::names::Identifier;
use crate::projection::{HandlerError, Projection};
use crate::runner::WaitError;
use crate::store::postgres::{pg_error, PostgresStore};
use crate::upcast::Upcaster;

type KeyFn<A> = dyn Fn(&Envelope<A>) -> Option<String> + Send + Sync;

/// A `cqrs-es` view kept in a PostgreSQL table by the projection runner.
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
/// # async fn demo(store: outflow::PostgresStore) -> Result<(), outflow::StoreError> {
/// let view = ViewProjection::<Counter, CounterView>::new("counter_view", "counter_view")?;
/// view.create_table(store.pool()).await?;
/// let options = ProjectionOptions::new(view);
/// # Ok(()) }
/// ```
pub struct ViewProjection<A: Aggregate, V> {
    name: String,
    table: String,
    key: Arc<KeyFn<A>>,
    upcasters: Arc<[Box<dyn Upcaster>]>,
    select: String,
    upsert: String,
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
            select: format!(
                "SELECT v.view_id, v.version, v.payload FROM {table} v WHERE v.view_id = ANY($1::text[])"
            ),
            upsert: format!(
                "INSERT INTO {table} AS v (view_id, version, payload)
                 SELECT k, n, p::json FROM UNNEST($1::text[], $2::bigint[], $3::text[]) AS u(k, n, p)
                 ON CONFLICT (view_id) DO UPDATE SET version = EXCLUDED.version, payload = EXCLUDED.payload"
            ),
            table,
            key: Arc::new(|event: &Envelope<A>| Some(event.aggregate_id.clone())),
            upcasters: Arc::from(Vec::new()),
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
    pub fn with_upcasters(mut self, upcasters: Vec<Box<dyn Upcaster>>) -> Self {
        self.upcasters = upcasters.into();
        self
    }

    /// Creates the view table if it does not exist.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn create_table<'e>(&self, executor: impl PgExecutor<'e>) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                view_id text PRIMARY KEY,
                version bigint NOT NULL CHECK (version >= 0),
                payload json NOT NULL)",
            self.table
        ))
        .execute(executor)
        .await
        .map_err(|e| pg_error("creating a view table", e))?;
        Ok(())
    }

    /// Reads one view.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`]; [`StoreError::Corrupt`] when the stored JSON
    /// does not fit `V`.
    pub async fn load<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        view_id: &str,
    ) -> Result<Option<V>, StoreError> {
        load_view(executor, &self.select, &self.table, view_id).await
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
    pub fn query(&self, store: &PostgresStore) -> ViewQuery<A, V> {
        ViewQuery {
            store: store.clone(),
            name: self.name.clone(),
            table: self.table.clone(),
            select: self.select.clone().into(),
            _types: PhantomData,
        }
    }
}

impl<A: Aggregate, V> Clone for ViewProjection<A, V> {
    fn clone(&self) -> Self {
        ViewProjection {
            name: self.name.clone(),
            table: self.table.clone(),
            key: self.key.clone(),
            upcasters: self.upcasters.clone(),
            select: self.select.clone(),
            upsert: self.upsert.clone(),
            _view: PhantomData,
        }
    }
}

/// Reads the views of a [`ViewProjection`], from anywhere in the
/// application; made by [`ViewProjection::query`].
pub struct ViewQuery<A, V> {
    store: PostgresStore,
    name: String,
    table: String,
    select: Arc<str>,
    _types: PhantomData<fn() -> (A, V)>,
}

impl<A, V> Clone for ViewQuery<A, V> {
    fn clone(&self) -> Self {
        ViewQuery {
            store: self.store.clone(),
            name: self.name.clone(),
            table: self.table.clone(),
            select: self.select.clone(),
            _types: PhantomData,
        }
    }
}

impl<A, V> std::fmt::Debug for ViewQuery<A, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewQuery")
            .field("projection", &self.name)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<A, V> ViewQuery<A, V>
where
    A: Aggregate + 'static,
    V: View<A> + 'static,
{
    /// The projection's name.
    pub fn projection(&self) -> &str {
        &self.name
    }

    /// Reads one view as it is now.
    ///
    /// # Errors
    ///
    /// As [`ViewProjection::load`].
    pub async fn load(&self, view_id: &str) -> Result<Option<V>, StoreError> {
        load_view(self.store.pool(), &self.select, &self.table, view_id).await
    }

    /// Reads one view once the projection has passed `checkpoint`
    /// (read-your-writes: pass [`Committed::checkpoint`](crate::Committed::checkpoint)
    /// of the command); `None` reads at once. Waits on the checkpoints in
    /// the store, so it works whichever node runs the projection.
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

async fn load_view<'e, V: serde::de::DeserializeOwned>(
    executor: impl PgExecutor<'e>,
    select: &str,
    table: &str,
    view_id: &str,
) -> Result<Option<V>, StoreError> {
    let row = sqlx::query(select)
        .bind(vec![view_id.to_owned()])
        .fetch_optional(executor)
        .await
        .map_err(|e| pg_error("reading a view", e))?;
    row.map(|row| {
        let payload: serde_json::Value = row
            .try_get("payload")
            .map_err(|e| pg_error("reading a view", e))?;
        serde_json::from_value(payload).map_err(|e| StoreError::Corrupt {
            table: table.to_owned(),
            what: format!("view `{view_id}` does not deserialize: {e}"),
        })
    })
    .transpose()
}

#[async_trait]
impl<A, V> Projection<PostgresStore> for ViewProjection<A, V>
where
    A: Aggregate + 'static,
    V: View<A> + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types([A::TYPE])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        // (key, view, version, last command applied)
        let mut views: Vec<(String, V, i64, Option<(String, u64)>)> = Vec::new();
        let mut decoded = Vec::with_capacity(events.len());
        for event in events {
            let envelope = event.decode_ref::<A>(&self.upcasters)?;
            if let Some(key) = (self.key)(&envelope) {
                decoded.push((key, envelope));
            }
        }
        let keys: Vec<String> = {
            let mut keys: Vec<String> = decoded.iter().map(|(k, _)| k.clone()).collect();
            keys.sort_unstable();
            keys.dedup();
            keys
        };
        if keys.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query(&self.select)
            .bind(&keys)
            .fetch_all(&mut **tx)
            .await?;
        for row in rows {
            let key: String = row.try_get("view_id")?;
            let version: i64 = row.try_get("version")?;
            let payload: serde_json::Value = row.try_get("payload")?;
            let view: V = serde_json::from_value(payload)?;
            views.push((key, view, version, None));
        }
        let mut index_of: HashMap<String, usize> = views
            .iter()
            .enumerate()
            .map(|(i, (key, ..))| (key.clone(), i))
            .collect();
        for (key, envelope) in &decoded {
            let index = *index_of.entry(key.clone()).or_insert_with(|| {
                views.push((key.clone(), V::default(), 0, None));
                views.len() - 1
            });
            let (_, view, version, last_command) = &mut views[index];
            // postgres-es bumps a view's version once per command dispatched
            // to it; a command's events share aggregate and transaction.
            let command = (envelope.aggregate_id.clone(), envelope.transaction_id);
            if last_command.as_ref() != Some(&command) {
                *version += 1;
                *last_command = Some(command);
            }
            view.update(&envelope.to_cqrs());
        }
        let mut ids = Vec::with_capacity(views.len());
        let mut versions = Vec::with_capacity(views.len());
        let mut payloads = Vec::with_capacity(views.len());
        for (key, view, version, _) in &views {
            ids.push(key.clone());
            versions.push(*version);
            payloads.push(serde_json::to_string(view)?);
        }
        sqlx::query(&self.upsert)
            .bind(&ids)
            .bind(&versions)
            .bind(&payloads)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Creates the view table if it does not exist.
    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        self.create_table(&mut **tx).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(&format!("DELETE FROM {}", self.table))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
