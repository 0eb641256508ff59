//! The PostgreSQL event store (PostgreSQL 13 or newer).
//!
//! Every event row records the id of the transaction that wrote it (`xid8`).
//! Log readers order by `(transaction_id, position)` and read only rows of
//! transactions older than the oldest one still running, so a transaction
//! that took a position early and commits late is never skipped. The schema
//! keeps every `postgres-es` column with its meaning, and the first migration
//! turns a `postgres-es` database into an Outflow one in place.
//!
//! Appends are one statement each (no `BEGIN`/`COMMIT` round trips). Readers
//! in this process are woken directly after a commit; other nodes get one
//! coalesced `NOTIFY` per node after commits, never from inside the append
//! transaction (a `NOTIFY` there would serialize every commit on the server's
//! notification queue lock).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{ErrorKind, EventRef, StoreError};
use crate::event::{AppendRequest, Checkpoint, Metadata, RecordedEvent, Snapshot};
use crate::log::{EventLog, LogFilter, OldestTransaction};
use crate::names::Identifier;
use crate::store::{EventStore, LoadedStream, StreamEvent};
use crate::wake::{WakeSignal, Wakeups};

/// Schema migrations, applied in order, each once per events table.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "events table with a gap-safe global log",
        include_str!("postgres/migrations/001_events_log.sql"),
    ),
    (
        2,
        "projection state, nodes, dead letters, inbox",
        include_str!("postgres/migrations/002_projections.sql"),
    ),
    (
        3,
        "transactional outbox",
        include_str!("postgres/migrations/003_outbox.sql"),
    ),
    (
        4,
        "dead letters of broker messages",
        include_str!("postgres/migrations/004_message_dead_letters.sql"),
    ),
    (
        5,
        "lease fence: the epoch is part of a key",
        include_str!("postgres/migrations/005_lease_fence.sql"),
    ),
];

mod projection_store;

/// Key of the advisory lock that serializes concurrent migrations.
const MIGRATION_LOCK: i64 = 0x6f75_7466_6c6f_7701;

/// An [`EventStore`] in PostgreSQL. Cloning is cheap and shares the pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use outflow::{CommandBus, PostgresStore};
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// let store = PostgresStore::connect("postgres://app@127.0.0.1/app").await?;
/// let bus = CommandBus::<Counter, _>::new(store.clone(), ());
/// let committed = bus.execute("c-1", CounterCommand::Increment { by: 1 }).await?;
/// println!("written at position {}", committed.events[0].position);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    sql: Queries,
    events_table: String,
    channel: String,
    checkpoint_channel: String,
    wake: WakeSignal,
    checkpoint_wake: WakeSignal,
    poll_interval: Duration,
    notify: Option<mpsc::Sender<()>>,
    notify_checkpoints: Option<mpsc::Sender<()>>,
    projection_sql: projection_store::Queries,
    /// Appends made inside callers' transactions, and how many of them a
    /// commit has woken readers for.
    appends_in_transactions: AtomicU64,
    appends_woken: AtomicU64,
    listener_started: OnceLock<()>,
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug)]
struct Queries {
    append: String,
    append_one: String,
    stream_head: String,
    read_stream: String,
    load: String,
    load_with_snapshot: String,
    save_snapshot: String,
    read_log: String,
    head: String,
    ids_ahead: String,
    rebase: String,
    rebase_projections: String,
}

/// Builds a [`PostgresStore`] on an existing pool.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), outflow::StoreError> {
/// use std::time::Duration;
/// let store = outflow::PostgresStore::builder(pool)
///     .events_table("bank.events")
///     .poll_interval(Duration::from_secs(1))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PostgresStoreBuilder {
    pool: PgPool,
    events_table: String,
    snapshots_table: Option<String>,
    migrate: bool,
    notify_other_nodes: bool,
    notify_interval: Duration,
    poll_interval: Duration,
}

impl PostgresStoreBuilder {
    /// The events table (default `events`, the `postgres-es` name); may be
    /// schema-qualified.
    pub fn events_table(mut self, name: impl Into<String>) -> Self {
        self.events_table = name.into();
        self
    }

    /// The snapshots table (default: the events table's name + `_snapshots`).
    pub fn snapshots_table(mut self, name: impl Into<String>) -> Self {
        self.snapshots_table = Some(name.into());
        self
    }

    /// Whether [`build`](Self::build) applies pending schema migrations
    /// (default `true`). Turn off when migrations are run by deployment
    /// tooling through [`PostgresStore::migrate`].
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Whether to send a coalesced `NOTIFY` after commits so log readers on
    /// other nodes wake at once (default `true`).
    pub fn notify_other_nodes(mut self, notify: bool) -> Self {
        self.notify_other_nodes = notify;
        self
    }

    /// The least time between two `NOTIFY`s from this node (default 5 ms):
    /// commits in between share one notification.
    pub fn notify_interval(mut self, interval: Duration) -> Self {
        self.notify_interval = interval;
        self
    }

    /// How often log readers look for new events without a signal (default
    /// 500 ms). Covers lost notifications and writers outside Outflow.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Validates the table names, applies pending migrations (unless turned
    /// off) and starts the notifier.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] for a bad table name;
    /// [`StoreError::Migration`] when a migration fails.
    pub async fn build(self) -> Result<PostgresStore, StoreError> {
        let names = Names::new(&self.events_table, self.snapshots_table.as_deref())?;
        let channel = format!("outflow_{}", names.events.to_string().replace('.', "_"));
        let checkpoint_channel = format!("{channel}_checkpoints");
        if channel.len() > 63 {
            return Err(StoreError::InvalidIdentifier {
                what: "notification channel derived from the events table",
                name: channel,
                reason: "longer than 63 bytes",
            });
        }
        if checkpoint_channel.len() > 63 {
            return Err(StoreError::InvalidIdentifier {
                what: "notification channel derived from the events table",
                name: checkpoint_channel,
                reason: "longer than 63 bytes",
            });
        }
        let events = names.events.clone();
        let render = |sql: &str| names.render(sql);
        let sql = Queries {
            append: render(include_str!("postgres/queries/append.sql")),
            append_one: render(include_str!("postgres/queries/append_one.sql")),
            stream_head: render(include_str!("postgres/queries/stream_head.sql")),
            read_stream: render(include_str!("postgres/queries/read_stream.sql")),
            load: render(include_str!("postgres/queries/load.sql")),
            load_with_snapshot: render(include_str!("postgres/queries/load_with_snapshot.sql")),
            save_snapshot: render(include_str!("postgres/queries/save_snapshot.sql")),
            read_log: render(include_str!("postgres/queries/read_log.sql")),
            head: render(include_str!("postgres/queries/head.sql")),
            ids_ahead: render(
                "SELECT COALESCE((SELECT e.transaction_id FROM {events} e \
                  ORDER BY e.transaction_id DESC LIMIT 1) >= pg_current_xact_id(), false)",
            ),
            rebase: render(include_str!("postgres/queries/rebase.sql")),
            rebase_projections: render(include_str!("postgres/queries/rebase_projections.sql")),
        };
        if self.migrate {
            migrate(&self.pool, &names).await?;
        }
        let projection_sql = projection_store::Queries::new(&names);
        let shutdown = CancellationToken::new();
        let notifier = |channel: &String| {
            spawn_notifier(
                self.pool.clone(),
                channel.clone(),
                self.notify_interval,
                shutdown.clone(),
            )
        };
        let notify = self.notify_other_nodes.then(|| notifier(&channel));
        let notify_checkpoints = self
            .notify_other_nodes
            .then(|| notifier(&checkpoint_channel));
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                sql,
                events_table: events.to_string(),
                channel,
                checkpoint_channel,
                wake: WakeSignal::new(),
                checkpoint_wake: WakeSignal::new(),
                poll_interval: self.poll_interval,
                notify,
                notify_checkpoints,
                projection_sql,
                appends_in_transactions: AtomicU64::new(0),
                appends_woken: AtomicU64::new(0),
                listener_started: OnceLock::new(),
                shutdown,
            }),
        })
    }
}

impl PostgresStore {
    /// Connects with a pool tuned for Outflow's short statements and builds a
    /// store with default settings, applying pending migrations.
    ///
    /// The pool does not ping the server before handing out a connection
    /// (`test_before_acquire(false)`): a broken connection fails the
    /// statement instead, with a [retryable](StoreError::is_retryable) error,
    /// and that ping would otherwise cost a round trip per command.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`] when the server cannot be reached; as
    /// [`PostgresStoreBuilder::build`] otherwise.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .test_before_acquire(false)
            .connect(url)
            .await
            .map_err(|e| pg_error("connecting to PostgreSQL", e))?;
        Self::builder(pool).build().await
    }

    /// A builder on an existing pool.
    pub fn builder(pool: PgPool) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            pool,
            events_table: "events".to_owned(),
            snapshots_table: None,
            migrate: true,
            notify_other_nodes: true,
            notify_interval: Duration::from_millis(5),
            poll_interval: Duration::from_millis(500),
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The events table, as configured (possibly schema-qualified).
    pub fn events_table(&self) -> &str {
        &self.inner.events_table
    }

    /// The `LISTEN`/`NOTIFY` channel this store signals new events on.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// Applies pending schema migrations (what [`PostgresStoreBuilder::build`]
    /// does unless told not to). Safe to run from several processes at once.
    ///
    /// # Errors
    ///
    /// [`StoreError::Migration`].
    pub async fn migrate(pool: &PgPool, events_table: &str) -> Result<(), StoreError> {
        migrate(pool, &Names::new(events_table, None)?).await
    }

    /// Repairs the log after a logical dump and restore (`pg_dump` /
    /// `pg_restore` into another cluster), where transaction ids start again
    /// from a lower value: rows written by the old cluster would otherwise sort
    /// after the new cluster's, and readers would miss new events.
    ///
    /// When the stored transaction ids are ahead of this cluster's, sets all of
    /// them to 0 (every restored row is committed, so log order becomes
    /// position order) and returns the number of rows changed; otherwise
    /// changes nothing and returns 0. Run it once after the restore, before
    /// writers start. A reader's checkpoint `(t, p)` from before the restore
    /// continues as `Checkpoint::new(0, p)`. Physical backups, streaming
    /// replicas and `pg_upgrade` keep transaction ids and need none of this.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn rebase_after_restore(&self) -> Result<u64, StoreError> {
        let failed = |e| pg_error("rebasing transaction ids after a restore", e);
        let mut tx = self.inner.pool.begin().await.map_err(failed)?;
        let ahead: bool = sqlx::query_scalar(&self.inner.sql.ids_ahead)
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?;
        if !ahead {
            return Ok(0);
        }
        let changed = sqlx::raw_sql(&self.inner.sql.rebase)
            .execute(&mut *tx)
            .await
            .map_err(failed)?
            .rows_affected();
        sqlx::raw_sql(&self.inner.sql.rebase_projections)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        self.signal_commit();
        Ok(changed)
    }

    /// Counts an append made inside a caller's transaction, for
    /// [`appends_committed`](Self::appends_committed).
    fn appended_in_transaction(&self) {
        self.inner
            .appends_in_transactions
            .fetch_add(1, Ordering::AcqRel);
    }

    /// After a commit: wakes readers when appends were made in transactions
    /// since the last such wake-up. The driver's transaction type cannot say
    /// whether this very transaction appended; a wake-up that comes early
    /// (another transaction's commit) is followed by the readers' quick
    /// re-checks, so none is lost.
    fn appends_committed(&self) {
        let appended = self.inner.appends_in_transactions.load(Ordering::Acquire);
        if self.inner.appends_woken.swap(appended, Ordering::AcqRel) != appended {
            self.signal_commit();
        }
    }

    fn signal_commit(&self) {
        self.inner.wake.wake();
        if let Some(notify) = &self.inner.notify {
            // Full means a NOTIFY is already pending: this commit rides on it.
            let _ = notify.try_send(());
        }
    }

    async fn append_on(
        &self,
        connection: &mut PgConnection,
        request: AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let expected = to_i64(request.expected_version);
        let count = request.events.len();
        let mut types = Vec::with_capacity(count);
        let mut versions = Vec::with_capacity(count);
        let mut payloads = Vec::with_capacity(count);
        let mut metadata = Vec::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        let mut correlations = Vec::with_capacity(count);
        let mut causations = Vec::with_capacity(count);
        for event in &request.events {
            types.push(event.event_type.as_str());
            versions.push(event.event_version.as_str());
            payloads.push(event.payload.to_string());
            metadata.push(serde_json::to_string(&event.metadata).map_err(|source| {
                StoreError::Serialize {
                    what: "event metadata",
                    aggregate_type: request.aggregate_type.clone(),
                    aggregate_id: request.aggregate_id.clone(),
                    source,
                }
            })?);
            ids.push(event.event_id);
            correlations.push(event.correlation_id);
            causations.push(event.causation_id);
        }
        let rows = if count == 1 {
            sqlx::query(&self.inner.sql.append_one)
                .bind(&request.aggregate_type)
                .bind(&request.aggregate_id)
                .bind(expected)
                .bind(types[0])
                .bind(versions[0])
                .bind(&payloads[0])
                .bind(&metadata[0])
                .bind(ids[0])
                .bind(correlations[0])
                .bind(causations[0])
                .fetch_all(&mut *connection)
                .await
        } else {
            sqlx::query(&self.inner.sql.append)
                .bind(&request.aggregate_type)
                .bind(&request.aggregate_id)
                .bind(expected)
                .bind(&types)
                .bind(&versions)
                .bind(&payloads)
                .bind(&metadata)
                .bind(&ids)
                .bind(&correlations)
                .bind(&causations)
                .fetch_all(&mut *connection)
                .await
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                return Err(StoreError::Conflict {
                    aggregate_type: request.aggregate_type,
                    aggregate_id: request.aggregate_id,
                    expected: request.expected_version,
                    actual: None,
                })
            }
            Err(e) => return Err(pg_error("appending events", e)),
        };
        if rows.len() != count {
            return Err(self.refusal(connection, request).await);
        }
        let mut written: Vec<Option<(u64, u64, DateTime<Utc>)>> = vec![None; count];
        for row in &rows {
            let sequence = u64_column(row, "sequence", &self.inner.events_table)?;
            let slot = sequence
                .checked_sub(request.expected_version + 1)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i < count)
                .ok_or_else(|| {
                    corrupt(
                        &self.inner.events_table,
                        "append returned a foreign sequence",
                    )
                })?;
            written[slot] = Some((
                u64_column(row, "position", &self.inner.events_table)?,
                txid_column(row, &self.inner.events_table)?,
                row.try_get("recorded_at")
                    .map_err(|e| pg_error("reading appended rows", e))?,
            ));
        }
        let AppendRequest {
            aggregate_type,
            aggregate_id,
            expected_version,
            events,
        } = request;
        events
            .into_iter()
            .zip(written)
            .enumerate()
            .map(|(i, (event, slot))| {
                let (position, transaction_id, recorded_at) = slot.ok_or_else(|| {
                    corrupt(&self.inner.events_table, "append returned too few rows")
                })?;
                Ok(RecordedEvent {
                    event_id: event.event_id,
                    aggregate_type: aggregate_type.clone(),
                    aggregate_id: aggregate_id.clone(),
                    sequence: expected_version + i as u64 + 1,
                    position,
                    transaction_id,
                    recorded_at,
                    event_type: event.event_type,
                    event_version: event.event_version,
                    payload: event.payload,
                    metadata: event.metadata,
                    correlation_id: event.correlation_id,
                    causation_id: event.causation_id,
                })
            })
            .collect()
    }

    /// Says why the append guard refused a write.
    async fn refusal(&self, connection: &mut PgConnection, request: AppendRequest) -> StoreError {
        let head = sqlx::query(&self.inner.sql.stream_head)
            .bind(&request.aggregate_type)
            .bind(&request.aggregate_id)
            .fetch_optional(&mut *connection)
            .await;
        match head {
            Ok(Some(row)) => {
                let actual = row
                    .try_get::<i64, _>("sequence")
                    .ok()
                    .and_then(|s| u64::try_from(s).ok());
                let newer = row.try_get::<bool, _>("newer").unwrap_or(false);
                if actual == Some(request.expected_version) && newer {
                    StoreError::StaleTransaction {
                        aggregate_type: request.aggregate_type,
                        aggregate_id: request.aggregate_id,
                    }
                } else {
                    StoreError::Conflict {
                        aggregate_type: request.aggregate_type,
                        aggregate_id: request.aggregate_id,
                        expected: request.expected_version,
                        actual,
                    }
                }
            }
            Ok(None) => StoreError::Conflict {
                aggregate_type: request.aggregate_type,
                aggregate_id: request.aggregate_id,
                expected: request.expected_version,
                actual: Some(0),
            },
            Err(e) => pg_error("reading the stream head after a refused append", e),
        }
    }

    fn listen(&self) {
        if self.inner.listener_started.set(()).is_err() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no tokio runtime: log readers fall back to polling");
            return;
        };
        let pool = self.inner.pool.clone();
        let channel = self.inner.channel.clone();
        let checkpoint_channel = self.inner.checkpoint_channel.clone();
        let shutdown = self.inner.shutdown.clone();
        let wake = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let channels = [channel.as_str(), checkpoint_channel.as_str()];
                if let Err(error) = listen_once(&pool, channels, &shutdown, &wake).await {
                    tracing::warn!(%channel, "listener failed, reconnecting: {error}");
                }
                if shutdown.is_cancelled() || wake.strong_count() == 0 {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    fn decode_rows(&self, rows: Vec<PgRow>) -> Result<Vec<RecordedEvent>, StoreError> {
        rows.iter()
            .map(|row| decode_event(row, &self.inner.events_table))
            .collect()
    }
}

/// One `LISTEN` session: wakes readers on each notification, and once on
/// connecting (notifications sent while it was away are lost).
async fn listen_once(
    pool: &PgPool,
    [events_channel, checkpoint_channel]: [&str; 2],
    shutdown: &CancellationToken,
    inner: &std::sync::Weak<Inner>,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([events_channel, checkpoint_channel])
        .await?;
    // Which signals to raise: `None` wakes both (after connecting or losing
    // the connection, anything may have been missed).
    let wake = |channel: Option<&str>| match inner.upgrade() {
        Some(inner) => {
            if channel != Some(checkpoint_channel) {
                inner.wake.wake();
            }
            if channel != Some(events_channel) {
                inner.checkpoint_wake.wake();
            }
            true
        }
        None => false,
    };
    if !wake(None) {
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            received = listener.try_recv() => {
                // `Ok(None)`: the connection was lost; the next call reconnects
                // and listens again.
                let channel = received?;
                if !wake(channel.as_ref().map(|n| n.channel())) {
                    return Ok(());
                }
            }
        }
    }
}

/// Sends one `NOTIFY` on `channel` per signal received, at most one per
/// `interval` (signals in between share it), always outside any transaction.
pub(crate) fn spawn_notifier(
    pool: PgPool,
    channel: String,
    interval: Duration,
    shutdown: CancellationToken,
) -> mpsc::Sender<()> {
    let (sender, mut receiver) = mpsc::channel::<()>(1);
    let task = async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                signal = receiver.recv() => if signal.is_none() { return },
            }
            if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                .bind(&channel)
                .execute(&pool)
                .await
            {
                // Readers on other nodes still find the rows at their next poll.
                tracing::debug!(%channel, "NOTIFY failed: {error}");
            }
            tokio::time::sleep(interval).await;
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(task);
        }
        Err(_) => tracing::warn!("no tokio runtime: other nodes will not be notified"),
    }
    sender
}

/// The validated names of every table and index a store uses, and the
/// rendering of SQL templates with them.
#[derive(Debug, Clone)]
struct Names {
    events: Identifier,
    replacements: Vec<(&'static str, String)>,
}

impl Names {
    fn new(events_table: &str, snapshots_table: Option<&str>) -> Result<Self, StoreError> {
        let events = Identifier::parse(events_table, "events table")?;
        let snapshots = match snapshots_table {
            Some(name) => Identifier::parse(name, "snapshots table")?,
            None => events.derived("snapshots", "snapshots table")?,
        };
        let unqualified = |id: Identifier| format!("\"{}\"", id.name());
        let log_idx = unqualified(events.derived("log_idx", "events log index name")?);
        let type_log_idx = unqualified(events.derived("type_log_idx", "events type index name")?);
        let projections = events.derived("projections", "projections table")?.quoted();
        let nodes = events.derived("nodes", "nodes table")?.quoted();
        let dead_letters = events
            .derived("dead_letters", "dead letters table")?
            .quoted();
        let dead_letters_idx = unqualified(events.derived("dl_idx", "dead letters index name")?);
        let epoch_key = unqualified(events.derived("epoch_key", "projections epoch key name")?);
        let inbox = events.derived("inbox", "inbox table")?.quoted();
        let outbox = events.derived("outbox", "outbox table")?.quoted();
        let outbox_log_idx = unqualified(events.derived("ob_log_idx", "outbox log index name")?);
        let outbox_key_idx = unqualified(events.derived("ob_key_idx", "outbox key index name")?);
        let dead_messages = events
            .derived("dead_messages", "dead messages table")?
            .quoted();
        let replacements = vec![
            (
                "{columns}",
                include_str!("postgres/queries/columns.sql")
                    .trim_end()
                    .to_owned(),
            ),
            ("{events_log_idx}", log_idx),
            ("{events_type_log_idx}", type_log_idx),
            ("{dead_letters_projection_idx}", dead_letters_idx),
            ("{projections_epoch_key}", epoch_key),
            ("{dead_letters}", dead_letters),
            ("{projections}", projections),
            ("{nodes}", nodes),
            ("{inbox}", inbox),
            ("{outbox_log_idx}", outbox_log_idx),
            ("{outbox_key_idx}", outbox_key_idx),
            ("{outbox}", outbox),
            ("{dead_messages}", dead_messages),
            ("{snapshots}", snapshots.quoted()),
            ("{events}", events.quoted()),
        ];
        Ok(Names {
            events,
            replacements,
        })
    }

    fn render(&self, sql: &str) -> String {
        self.replacements
            .iter()
            .fold(sql.to_owned(), |sql, (placeholder, value)| {
                sql.replace(placeholder, value)
            })
    }
}

async fn migrate(pool: &PgPool, names: &Names) -> Result<(), StoreError> {
    let events = &names.events;
    let failed = |version: i32, name: &'static str| {
        move |e: sqlx::Error| StoreError::Migration {
            version,
            name,
            source: Box::new(e),
        }
    };
    let mut tx = pool.begin().await.map_err(failed(0, "begin"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(failed(0, "lock"))?;
    let ledger = match events.to_string().split_once('.') {
        Some((schema, _)) => format!("\"{schema}\".\"outflow_migrations\""),
        None => "\"outflow_migrations\"".to_owned(),
    };
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {ledger} (
            events_table text NOT NULL,
            version integer NOT NULL,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (events_table, version))"
    ))
    .execute(&mut *tx)
    .await
    .map_err(failed(0, "migrations ledger"))?;
    let applied: Vec<i32> = sqlx::query_scalar(&format!(
        "SELECT version FROM {ledger} WHERE events_table = $1"
    ))
    .bind(events.to_string())
    .fetch_all(&mut *tx)
    .await
    .map_err(failed(0, "read ledger"))?;
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let sql = names.render(sql);
        sqlx::raw_sql(&sql)
            .execute(&mut *tx)
            .await
            .map_err(failed(version, name))?;
        sqlx::query(&format!(
            "INSERT INTO {ledger} (events_table, version, name) VALUES ($1, $2, $3)"
        ))
        .bind(events.to_string())
        .bind(version)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(failed(version, name))?;
        tracing::info!(table = %events, version, name, "applied migration");
    }
    tx.commit().await.map_err(failed(0, "commit"))
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut connection = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(|e| pg_error("acquiring a connection to append", e))?;
        let written = self.append_on(&mut connection, request).await?;
        if !written.is_empty() {
            self.signal_commit();
        }
        Ok(written)
    }

    async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&self.inner.sql.read_stream)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(to_i64(after_sequence))
            .bind(to_i64(limit as u64))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading a stream", e))?;
        self.decode_rows(rows)
    }

    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        use_snapshot: bool,
    ) -> Result<LoadedStream, StoreError> {
        let query = if use_snapshot {
            &self.inner.sql.load_with_snapshot
        } else {
            &self.inner.sql.load
        };
        let rows = sqlx::query(query)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| pg_error("loading a stream", e))?;
        let table = &self.inner.events_table;
        let get = |e| pg_error("loading a stream", e);
        let mut loaded = LoadedStream::default();
        loaded.events.reserve(rows.len());
        for row in &rows {
            let kind: i32 = row.try_get("kind").map_err(get)?;
            let sequence = u64_column(row, "sequence", table)?;
            let payload: String = row.try_get("payload").map_err(get)?;
            if kind == 0 {
                let state = serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt {
                    table: table.clone(),
                    what: format!("snapshot of {aggregate_type} `{aggregate_id}` is not JSON: {e}"),
                })?;
                loaded.snapshot = Some(Snapshot {
                    aggregate_type: aggregate_type.to_owned(),
                    aggregate_id: aggregate_id.to_owned(),
                    version: sequence,
                    state,
                });
            } else {
                loaded.events.push(StreamEvent {
                    sequence,
                    position: u64_column(row, "position", table)?,
                    event_type: row.try_get("event_type").map_err(get)?,
                    event_version: row.try_get("event_version").map_err(get)?,
                    payload,
                });
            }
        }
        Ok(loaded)
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        sqlx::query(&self.inner.sql.save_snapshot)
            .bind(&snapshot.aggregate_type)
            .bind(&snapshot.aggregate_id)
            .bind(to_i64(snapshot.version))
            .bind(snapshot.state.to_string())
            .execute(&self.inner.pool)
            .await
            .map_err(|e| pg_error("saving a snapshot", e))?;
        Ok(())
    }
}

#[async_trait]
impl EventLog for PostgresStore {
    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let (clause, binds) = filter_sql(filter, 4);
        let sql = self.inner.sql.read_log.replace("{filter}", &clause);
        let query = sqlx::query(&sql)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .bind(to_i64(limit as u64));
        let query = bind_filter(query, binds);
        let rows = query
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading the global log", e))?;
        self.decode_rows(rows)
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        let row = sqlx::query(&self.inner.sql.head)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading the head of the log", e))?;
        match row {
            None => Ok(Checkpoint::START),
            Some(row) => Ok(Checkpoint::new(
                txid_column(&row, &self.inner.events_table)?,
                u64_column(&row, "position", &self.inner.events_table)?,
            )),
        }
    }

    fn wakeups(&self) -> Wakeups {
        self.listen();
        self.inner.wake.subscribe(self.inner.poll_interval)
    }

    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError> {
        self.count_log_events(filter, after, upto, cap).await
    }

    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.first_pending(filter, after).await
    }

    async fn oldest_open_transaction(&self) -> Result<Option<OldestTransaction>, StoreError> {
        self.oldest_transaction().await
    }
}

/// A value bound for a [`filter_sql`] clause.
enum FilterBind {
    Text(String),
    Texts(Vec<String>),
    Int(i64),
}

/// The `AND ...` conditions for a filter, numbering parameters from `first`.
/// One aggregate type is compared with `=`, so the planner can walk the
/// `(aggregate_type, transaction_id, position)` index in log order.
fn filter_sql(filter: &LogFilter, first: usize) -> (String, Vec<FilterBind>) {
    let mut clause = String::new();
    let mut binds = Vec::new();
    let mut next = first;
    let mut param = |binds: &mut Vec<FilterBind>, bind: FilterBind| {
        binds.push(bind);
        next += 1;
        next - 1
    };
    match filter.aggregate_type_list() {
        [] => {}
        [one] => {
            let n = param(&mut binds, FilterBind::Text(one.clone()));
            clause.push_str(&format!(" AND e.aggregate_type = ${n}"));
        }
        many => {
            let n = param(&mut binds, FilterBind::Texts(many.to_vec()));
            clause.push_str(&format!(" AND e.aggregate_type = ANY(${n}::text[])"));
        }
    }
    if !filter.event_type_list().is_empty() {
        let n = param(
            &mut binds,
            FilterBind::Texts(filter.event_type_list().to_vec()),
        );
        clause.push_str(&format!(" AND e.event_type = ANY(${n}::text[])"));
    }
    if let Some(partition) = filter.partition() {
        let count = param(&mut binds, FilterBind::Int(i64::from(partition.count)));
        let index = param(&mut binds, FilterBind::Int(i64::from(partition.index)));
        clause.push_str(&format!(
            " AND mod(abs(hashtext(e.aggregate_id)::bigint), ${count}) = ${index}"
        ));
    }
    (clause, binds)
}

fn bind_filter<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    binds: Vec<FilterBind>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for bind in binds {
        query = match bind {
            FilterBind::Text(value) => query.bind(value),
            FilterBind::Texts(values) => query.bind(values),
            FilterBind::Int(value) => query.bind(value),
        };
    }
    query
}

fn decode_event(row: &PgRow, table: &str) -> Result<RecordedEvent, StoreError> {
    let get_err = |e: sqlx::Error| pg_error("decoding an event row", e);
    let aggregate_type: String = row.try_get("aggregate_type").map_err(get_err)?;
    let aggregate_id: String = row.try_get("aggregate_id").map_err(get_err)?;
    let sequence = u64_column(row, "sequence", table)?;
    let position = u64_column(row, "position", table)?;
    let event_type: String = row.try_get("event_type").map_err(get_err)?;
    let event_version: String = row.try_get("event_version").map_err(get_err)?;
    let metadata_value: Option<serde_json::Value> = row.try_get("metadata").map_err(get_err)?;
    let metadata = match metadata_value {
        None | Some(serde_json::Value::Null) => Metadata::new(),
        Some(value) => serde_json::from_value(value).map_err(|source| StoreError::Deserialize {
            event: Box::new(EventRef {
                aggregate_type: aggregate_type.clone(),
                aggregate_id: aggregate_id.clone(),
                sequence,
                position: Some(position),
                event_type: event_type.clone(),
                event_version: event_version.clone(),
            }),
            source,
        })?,
    };
    Ok(RecordedEvent {
        event_id: row.try_get::<Uuid, _>("event_id").map_err(get_err)?,
        transaction_id: txid_column(row, table)?,
        recorded_at: row.try_get("recorded_at").map_err(get_err)?,
        payload: row.try_get("payload").map_err(get_err)?,
        correlation_id: row.try_get("correlation_id").map_err(get_err)?,
        causation_id: row.try_get("causation_id").map_err(get_err)?,
        aggregate_type,
        aggregate_id,
        sequence,
        position,
        event_type,
        event_version,
        metadata,
    })
}

fn u64_column(row: &PgRow, column: &'static str, table: &str) -> Result<u64, StoreError> {
    let value: i64 = row
        .try_get(column)
        .map_err(|e| pg_error("decoding an event row", e))?;
    u64::try_from(value).map_err(|_| corrupt(table, &format!("negative {column} {value}")))
}

fn txid_column(row: &PgRow, table: &str) -> Result<u64, StoreError> {
    let text: String = row
        .try_get("txid")
        .map_err(|e| pg_error("decoding an event row", e))?;
    text.parse()
        .map_err(|_| corrupt(table, &format!("transaction id `{text}` is not a number")))
}

fn corrupt(table: &str, what: &str) -> StoreError {
    StoreError::Corrupt {
        table: table.to_owned(),
        what: what.to_owned(),
    }
}

/// Maps a sqlx error to [`StoreError::Database`] naming the operation.
pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| pg_error(operation, e)
}

/// A sqlx error as [`StoreError::Database`], classified by [`classify`].
pub(crate) fn pg_error(operation: &'static str, error: sqlx::Error) -> StoreError {
    StoreError::database(operation, classify(&error), error)
}

/// Values above `i64::MAX` are clamped: PostgreSQL's `bigint` cannot hold them,
/// and callers validate sequences before they get here.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Whose fault a sqlx error is, from its kind and SQLSTATE class.
///
/// - transient: lost or refused connections, pool timeouts, serialization
///   failures and deadlocks (`40001`, `40P01`), a server shutting down or
///   starting (`57P*`), too many connections and other exhausted resources
///   (`53*`), lock and statement timeouts (`55P03`, `57014`);
/// - infrastructure: what someone must fix: undefined tables and columns,
///   syntax and permission errors (`42*`), unsupported features (`0A*`),
///   authentication (`28*`), unknown database or schema (`3D*`, `3F*`),
///   server-side errors (`58*`, `XX*`), program limits (`54*`), and sqlx's
///   configuration and column-mapping errors;
/// - data: everything else: constraint violations (`23*`), bad values
///   (`22*`), errors raised by triggers, rows that do not decode.
pub(crate) fn classify(error: &sqlx::Error) -> ErrorKind {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => ErrorKind::Transient,
        sqlx::Error::Configuration(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Migrate(_) => ErrorKind::Infrastructure,
        sqlx::Error::Database(db) => db
            .code()
            .map_or(ErrorKind::Data, |code| classify_sqlstate(&code)),
        _ => ErrorKind::Data,
    }
}

/// Whose fault a PostgreSQL error is, by its SQLSTATE (see [`classify`]).
pub(crate) fn classify_sqlstate(code: &str) -> ErrorKind {
    let class = code.get(..2).unwrap_or(code);
    match class {
        "08" | "40" | "53" | "57" => ErrorKind::Transient,
        "55" if code == "55P03" => ErrorKind::Transient,
        "42" | "0A" | "28" | "3D" | "3F" | "58" | "XX" | "54" | "0L" | "0P" | "2F" | "39" => {
            ErrorKind::Infrastructure
        }
        _ => ErrorKind::Data,
    }
}
