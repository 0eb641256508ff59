//! The SQLite event store: one database file, no server.
//!
//! **Why positions are gap-free.** SQLite lets one transaction write at a
//! time, in this process and in every other process on the same file. An
//! append takes the write lock, numbers its events after the highest
//! position in the file, and commits before the next writer may start; so
//! positions become visible in the order they were given, and a plain
//! integer position is a gap-free global log: a reader that resumes after
//! position `p` can never miss an event that commits late. Each append's
//! events share one transaction id (the position of its first event), so
//! `(transaction id, position)` orders the log as the position does.
//!
//! **Connections.** Writes go through one connection (transactions begin
//! with `BEGIN IMMEDIATE`), so appends, projection batches and lease
//! renewals of one process queue for it instead of failing with "database
//! is locked"; reads use a pool of read-only connections, which in WAL mode
//! never wait for the writer. Several processes may share one file: writers
//! of different processes wait for each other up to the busy timeout
//! (default 5 s) and then fail with a [transient](crate::ErrorKind::Transient)
//! error, which long-running loops retry. Readers in this process are woken
//! by this process's commits at once, and poll for other processes' commits
//! (default every 100 ms).
//!
//! **Durability.** The file is in WAL mode with `synchronous = FULL` by
//! default: an acknowledged command (a committed append) survives a crash of
//! the process and a power cut. With [`Synchronous::Normal`] it survives a
//! crash of the process (SIGKILL included) but a power cut may lose the last
//! commits before the last checkpoint of the WAL; it never corrupts the file.
//!
//! The code is split by job like the PostgreSQL backend's: `schema`
//! (migrations), `append` (the command side), `log` (the global log),
//! `projection_store` (transactions, checkpoints, leases, dead letters,
//! inbox), `rows` (decoding) and `errors` (classification).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::error::StoreError;
use crate::wake::WakeSignal;

mod append;
mod dead_letters;
mod decisions;
mod errors;
mod group;
mod keys;
mod log;
mod outbox;
mod outcomes;
mod projection_store;
mod queries;
mod rows;
mod schema;
mod timers;
mod views;

pub(crate) use errors::{classify, db, sqlite_error, to_i64};
pub use outbox::SqliteOutbox;
use schema::Tables;

/// How hard SQLite makes each commit durable (its `synchronous` setting in
/// WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// Every commit is on disk before it is acknowledged: survives a crash
    /// of the process and a power cut. The default.
    #[default]
    Full,
    /// Commits are on disk at WAL checkpoints: survives a crash of the
    /// process; a power cut may lose the last commits. Faster on slow disks.
    Normal,
}

/// An event store in one SQLite file: every role trait
/// ([`EventStore`](crate::EventStore), [`EventLog`](crate::EventLog),
/// [`ProjectionStore`](crate::ProjectionStore), ...), like
/// [`PostgresStore`](crate::PostgresStore). Cloning is cheap and shares the
/// connections.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use outflow::{CommandBus, SqliteStore};
/// # use outflow::doc_fixture::{Counter, CounterCommand};
/// # let dir = std::env::temp_dir().join(format!("outflow-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let store = SqliteStore::open(dir.join("app.db")).await?;
/// let bus = CommandBus::<Counter, _>::new(store.clone(), ());
/// let committed = bus.execute("c-1", CounterCommand::Increment { by: 1 }).await?;
/// assert_eq!(committed.events[0].sequence, 1);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// One connection: every write transaction of this process.
    writer: SqlitePool,
    /// Read-only connections.
    readers: SqlitePool,
    /// A read-only connection outside the pool for loading streams, the
    /// command path's one read: a pool connection costs an extra round trip
    /// to SQLite's thread when it is given back. Taken by `close`.
    loader: tokio::sync::Mutex<Option<sqlx::SqliteConnection>>,
    path: PathBuf,
    tables: Tables,
    /// Every statement, rendered once for these tables.
    queries: queries::Queries,
    wake: WakeSignal,
    checkpoint_wake: WakeSignal,
    poll_interval: Duration,
    /// Appends made inside callers' transactions, and how many of them a
    /// commit has woken readers for.
    append_wakes: crate::store::sql::wakes::AppendWakes,
    /// The ring over the keys table, made on first use.
    key_ring: std::sync::OnceLock<crate::personal::KeyRing>,
    /// How long the ring caches a key.
    keys_cached_for: Duration,
    /// The append being written and those waiting to go as a group.
    group: group::Group,
}

/// Builds a [`SqliteStore`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use outflow::store::sqlite::{SqliteStore, Synchronous};
/// # let dir = std::env::temp_dir().join(format!("outflow-doc-b-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let store = SqliteStore::builder(dir.join("bank.db"))
///     .events_table("bank_events")
///     .synchronous(Synchronous::Normal)
///     .busy_timeout(Duration::from_secs(10))
///     .build()
///     .await?;
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), outflow::StoreError>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct SqliteStoreBuilder {
    path: PathBuf,
    events_table: String,
    synchronous: Synchronous,
    busy_timeout: Duration,
    poll_interval: Duration,
    readers: u32,
    migrate: bool,
    keys_cached_for: Duration,
}

impl SqliteStoreBuilder {
    /// The events table (default `events`); the other tables are named
    /// after it (`events_projections`, `events_leases`, ...).
    pub fn events_table(mut self, name: impl Into<String>) -> Self {
        self.events_table = name.into();
        self
    }

    /// Durability of commits (default [`Synchronous::Full`]).
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// How long a writer waits for another process's write transaction
    /// before failing with a transient error (default 5 s).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How often log readers look for commits of other processes (default
    /// 100 ms). This process's commits wake them at once.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long the store's [key ring](crate::personal::KeyRing) uses a
    /// key it read before reading it again (default 30 s): the longest a
    /// subject forgotten by another process stays readable in this one.
    pub fn keys_cached_for(mut self, cached_for: Duration) -> Self {
        self.keys_cached_for = cached_for;
        self
    }

    /// The number of read-only connections (default 4).
    pub fn readers(mut self, readers: u32) -> Self {
        self.readers = readers.max(1);
        self
    }

    /// Whether [`build`](Self::build) applies pending migrations (default
    /// `true`).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Opens (creating if missing) the file in WAL mode, applies pending
    /// migrations unless turned off, and opens the connections.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] for a bad table name;
    /// [`StoreError::Database`] when the file cannot be opened;
    /// [`StoreError::Migration`] when a migration fails.
    pub async fn build(self) -> Result<SqliteStore, StoreError> {
        let tables = Tables::new(&self.events_table)?;
        let url = format!("sqlite://{}", self.path.display());
        let base = SqliteConnectOptions::from_str(&url)
            .map_err(|e| sqlite_error("reading the SQLite path", e))?
            .filename(&self.path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match self.synchronous {
                Synchronous::Full => sqlx::sqlite::SqliteSynchronous::Full,
                Synchronous::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
            })
            .busy_timeout(self.busy_timeout)
            .foreign_keys(false)
            // Deleted content is overwritten, not left in free space: a
            // forgotten subject's key (and an application's erased rows)
            // leave no bytes behind in the file.
            .pragma("secure_delete", "ON");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .test_before_acquire(false)
            // A connection still inside a transaction that nothing owns
            // would swallow every later write: close it (SQLite rolls the
            // transaction back) and open a fresh one.
            .before_acquire(|connection, _| {
                Box::pin(async move {
                    let depth = <sqlx::sqlite::SqliteTransactionManager as sqlx::TransactionManager>::get_transaction_depth(connection);
                    if depth > 0 {
                        tracing::warn!(depth, "discarding a SQLite writer connection left inside a transaction");
                    }
                    Ok(depth == 0)
                })
            })
            .connect_with(base.clone().create_if_missing(true))
            .await
            .map_err(|e| sqlite_error("opening the SQLite file", e))?;
        if self.migrate {
            schema::migrate(&writer, &tables).await?;
        }
        let readers = SqlitePoolOptions::new()
            .max_connections(self.readers)
            .acquire_timeout(Duration::from_secs(60))
            .test_before_acquire(false)
            // Rows cross from SQLite's thread in batches, not 50 at a time.
            .connect_with(base.clone().read_only(true).row_buffer_size(1024))
            .await
            .map_err(|e| sqlite_error("opening the SQLite file for reading", e))?;
        let loader = sqlx::ConnectOptions::connect(&base.clone().read_only(true))
            .await
            .map_err(|e| sqlite_error("opening the SQLite file for reading", e))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer,
                readers,
                loader: tokio::sync::Mutex::new(Some(loader)),
                path: self.path,
                queries: queries::Queries::new(&tables),
                tables,
                wake: WakeSignal::new(),
                checkpoint_wake: WakeSignal::new(),
                poll_interval: self.poll_interval,
                append_wakes: Default::default(),
                key_ring: std::sync::OnceLock::new(),
                keys_cached_for: self.keys_cached_for,
                group: group::Group::default(),
            }),
        })
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` with default
    /// settings, applying pending migrations.
    ///
    /// # Errors
    ///
    /// As [`SqliteStoreBuilder::build`].
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(path).build().await
    }

    /// A builder for the database file at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: path.as_ref().to_path_buf(),
            events_table: "events".to_owned(),
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(100),
            keys_cached_for: Duration::from_secs(30),
            readers: 4,
            migrate: true,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The events table.
    pub fn events_table(&self) -> &str {
        &self.inner.tables.events
    }

    /// The connection every write goes through (one connection: use it for
    /// short statements only, or through the store's transactions).
    pub fn writer(&self) -> &SqlitePool {
        &self.inner.writer
    }

    /// Copies the write-ahead log into the file and truncates it to zero
    /// bytes (`PRAGMA wal_checkpoint(TRUNCATE)`), waiting up to the busy
    /// timeout for readers: afterwards the `-wal` file holds no copy of a
    /// page as it was before a deletion (the store does it after forgetting
    /// a subject; an application does it after erasing rows of its own).
    /// Returns `false` when readers kept it from finishing (try again).
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`].
    pub async fn truncate_wal(&self) -> Result<bool, StoreError> {
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.inner.writer)
            .await
            .map_err(db("checkpointing the write-ahead log"))?;
        Ok(busy == 0)
    }

    /// The read-only connections, for queries of read models.
    pub fn readers(&self) -> &SqlitePool {
        &self.inner.readers
    }

    /// The pool to query read models with, as
    /// `PostgresStore::pool` is on PostgreSQL:
    /// here the read-only connections ([`readers`](Self::readers)). Writes
    /// go through the store's transactions, or [`writer`](Self::writer).
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.readers
    }

    /// Closes the connections (waiting for those in use). The last process
    /// to close the file checkpoints its WAL into it and removes the `-wal`
    /// and `-shm` files beside it, so call it before the process exits to
    /// leave one file behind. The store (and its clones) cannot be used
    /// afterwards.
    pub async fn close(&self) {
        if let Some(loader) = self.inner.loader.lock().await.take() {
            // Closing is best effort: the file is consistent either way.
            let _ = sqlx::Connection::close(loader).await;
        }
        self.inner.readers.close().await;
        self.inner.writer.close().await;
    }

    /// Wakes this process's log readers after a commit.
    fn signal_commit(&self) {
        self.inner.wake.wake();
    }
}
