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
//!
//! The code is split by job: `schema` (names and migrations), `append` (the
//! command side), `log` (the global log and its counts), `notify` (wake-ups
//! and `LISTEN`), `projection_store` (transactions, checkpoints, leases, dead
//! letters, inbox), `rows` (decoding) and `errors` (classification). Every
//! query is a `.sql` file under `queries/` or `migrations/`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::wake::WakeSignal;

mod append;
mod dead_letters;
#[cfg(feature = "nats")]
mod dead_messages;
mod decisions;
mod errors;
mod group;
mod keys;
mod log;
mod notify;
mod outbox;
mod outcomes;
mod presence;
mod projection_store;
mod rows;
mod schema;
mod timers;
mod views;

#[cfg(feature = "nats")]
pub use dead_messages::PostgresDeadMessages;
pub(crate) use errors::{begin_owned, classify, db, pg_error, to_i64};
use notify::spawn_notifier;
pub use outbox::PostgresOutbox;
use rows::{txid_column, u64_column};
use schema::{migrate, Names};

/// An event store in PostgreSQL: every role trait ([`EventStore`](crate::EventStore),
/// [`EventLog`](crate::EventLog), [`ProjectionStore`](crate::ProjectionStore), ...).
/// Cloning is cheap and shares the pool.
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
    timer_sql: timers::TimerQueries,
    /// The keys' statements.
    key_sql: keys::KeyQueries,
    /// The ring over the keys table, made on first use.
    key_ring: OnceLock<crate::personal::KeyRing>,
    /// How long the ring caches a key.
    keys_cached_for: Duration,
    /// The tags table, quoted: decisions' statements are built per query.
    tags_table: String,
    /// The events table, quoted.
    events_sql: String,
    /// Appends made inside callers' transactions, and how many of them a
    /// commit has woken readers for.
    append_wakes: crate::store::sql::wakes::AppendWakes,
    listener_started: OnceLock<()>,
    /// Appends in flight and those waiting to go as a group.
    group: group::Group,
    /// The presence locks of the nodes running on this store.
    presences: presence::Presences,
    /// This store's id in its notifications, so its own listener skips them.
    instance: String,
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

crate::store::sql::statements::sql_statements! {
    /// The event side's statements, one `.sql` file each under `queries/`.
    struct Queries in "postgres/queries/" {
        append,
        append_one,
        append_group,
        stream_head,
        read_stream,
        load,
        load_with_snapshot,
        save_snapshot,
        read_log,
        read_window,
        head,
        committed_head,
        count_events,
        first_pending,
        oldest_transaction,
        ids_ahead,
        rebase,
        rebase_projections,
        outcome,
        record_outcome,
        claim_command,
        prune_outcomes,
        tag_locks,
        append_tagged,
    }
}

/// A driver error with the server it came from.
#[derive(Debug, thiserror::Error)]
#[error("server {server}")]
struct ServerError {
    server: String,
    source: sqlx::Error,
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
#[must_use = "a builder does nothing until it is built"]
pub struct PostgresStoreBuilder {
    pool: PgPool,
    events_table: String,
    snapshots_table: Option<String>,
    migrate: bool,
    notify_other_nodes: bool,
    notify_interval: Duration,
    poll_interval: Duration,
    keys_cached_for: Duration,
    synchronous_projection_commits: bool,
}

impl PostgresStoreBuilder {
    /// Whether a projection's batch (or a park) waits at its commit for the
    /// server to flush it to disk (default `true`). With `false` the batch's
    /// checkpoint statement sets
    /// `synchronous_commit = off` for its own transaction (no extra round
    /// trip): the commit returns before the flush, which halves the flushes
    /// per command while a projection is live. Exactly-once still holds: a
    /// crash of the server can lose the last batches' commits (up to three
    /// times `wal_writer_delay`, 600 ms by default), but their read-model
    /// writes and their checkpoint are lost together, and the runner applies
    /// those events again. What is given up: a [`wait_for`](crate::runner::wait_for)
    /// answered before such a crash may find its read model behind again for
    /// a moment after the restart. Events and commands are not affected:
    /// they always commit durably.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), outflow::StoreError> {
    /// let store = outflow::PostgresStore::builder(pool)
    ///     .synchronous_projection_commits(false)
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn synchronous_projection_commits(mut self, synchronous: bool) -> Self {
        self.synchronous_projection_commits = synchronous;
        self
    }

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

    /// How long the store's [key ring](crate::personal::KeyRing) uses a
    /// key it read before reading it again (default 30 s): the longest a
    /// subject forgotten by another process stays readable in this one.
    pub fn keys_cached_for(mut self, cached_for: Duration) -> Self {
        self.keys_cached_for = cached_for;
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
        let sql = Queries::new(|sql| names.render(sql));
        if self.migrate {
            migrate(&self.pool, &names).await?;
        }
        let mut projection_sql = projection_store::Queries::new(|sql| names.render(sql));
        if !self.synchronous_projection_commits {
            // A local setting: it ends with the batch's transaction.
            projection_sql
                .save_checkpoint
                .push_str("\nRETURNING pg_catalog.set_config('synchronous_commit', 'off', true)");
        }
        let timer_sql = timers::TimerQueries::new(|sql| names.render(sql));
        let key_sql = keys::KeyQueries::new(|sql| names.render(sql));
        let shutdown = CancellationToken::new();
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let notifier = |channel: &String| {
            spawn_notifier(
                self.pool.clone(),
                channel.clone(),
                instance.clone(),
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
                timer_sql,
                key_sql,
                key_ring: OnceLock::new(),
                keys_cached_for: self.keys_cached_for,
                tags_table: names.render("{tags}"),
                events_sql: names.render("{events}"),
                append_wakes: Default::default(),
                listener_started: OnceLock::new(),
                group: group::Group::default(),
                presences: presence::Presences::default(),
                instance,
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
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| pg_error("reading the PostgreSQL URL", e))?;
        // The server's notices (`relation … already exists, skipping` from
        // every `CREATE … IF NOT EXISTS` of a setup hook) are not news:
        // only warnings and errors reach the log.
        let options = options.options([("client_min_messages", "warning")]);
        // One connection first, outside the pool: an unreachable server or a
        // refused login fails at once with the server's own error, instead
        // of the pool retrying until its acquire timeout.
        // The error names the server (host, port, database), never the
        // credentials.
        let server = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("postgres")
        );
        let connecting = |e: sqlx::Error| {
            StoreError::database(
                "connecting to PostgreSQL",
                classify(&e),
                ServerError {
                    server: server.clone(),
                    source: e,
                },
            )
        };
        let first = options.connect().await.map_err(connecting)?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(connecting)?;
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
            keys_cached_for: Duration::from_secs(30),
            synchronous_projection_commits: true,
        }
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Stops the store's background listener and closes its pool (as
    /// [`SqliteStore::close`](crate::SqliteStore::close) does): every clone
    /// of the store is closed; pending queries finish first.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        self.inner.pool.close().await;
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
        let mut tx = begin_owned(&self.inner.pool).await.map_err(failed)?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_query_is_rendered() {
        let names = Names::new("events", None).expect("valid");
        let queries = Queries::new(|sql| names.render(sql));
        // `{filter}` is a log filter's clause and `{condition}` an append's
        // condition, given per call.
        crate::store::sql::statements::assert_rendered(
            queries.statements(),
            &["filter", "condition"],
        );
        assert!(queries.ids_ahead.contains("\"events\""));
    }
}
