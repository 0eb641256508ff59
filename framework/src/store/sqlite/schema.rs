//! Table names and versioned migrations for SQLite, recorded per events
//! table in `outflow_migrations` like the PostgreSQL backend's.

use sqlx::SqlitePool;

use crate::error::StoreError;
use crate::names::Identifier;

/// The store's tables, validated and quoted for SQL.
#[derive(Debug, Clone)]
pub(super) struct Tables {
    /// The events table as configured (unquoted).
    pub(super) events: String,
    replacements: Vec<(&'static str, String)>,
}

impl Tables {
    pub(super) fn new(events_table: &str) -> Result<Self, StoreError> {
        let events = Identifier::parse(events_table, "events table")?;
        if events_table.contains('.') {
            return Err(StoreError::InvalidIdentifier {
                what: "events table",
                name: events_table.to_owned(),
                reason: "SQLite tables take no schema",
            });
        }
        let mut replacements = Vec::new();
        for (placeholder, suffix, what) in [
            ("{snapshots}", "snapshots", "snapshots table"),
            ("{projections}", "projections", "projections table"),
            ("{leases}", "leases", "leases table"),
            ("{nodes}", "nodes", "nodes table"),
            ("{dead_letters}", "dead_letters", "dead letters table"),
            ("{inbox}", "inbox", "inbox table"),
            ("{outcomes}", "outcomes", "outcomes table"),
            ("{outcomes_idx}", "outcomes_idx", "outcomes index"),
            ("{outbox}", "outbox", "outbox table"),
            ("{events_type_idx}", "type_idx", "events type index"),
            ("{events_stream_idx}", "stream_idx", "events stream index"),
            (
                "{dead_letters_projection_idx}",
                "dead_letters_projection_idx",
                "dead letters index",
            ),
        ] {
            replacements.push((placeholder, events.derived(suffix, what)?.quoted()));
        }
        // `{events}` last: the other placeholders contain it as a prefix.
        replacements.push(("{events}", events.quoted()));
        Ok(Tables {
            events: events_table.to_owned(),
            replacements,
        })
    }

    /// `sql` with the table placeholders replaced.
    pub(super) fn render(&self, sql: &str) -> String {
        self.replacements
            .iter()
            .fold(sql.to_owned(), |sql, (placeholder, value)| {
                sql.replace(placeholder, value)
            })
    }

    /// The unquoted name of a companion table (`projections`, `leases`, ...).
    pub(super) fn companion(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.events)
    }
}

/// The migrations, in order: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial schema", INITIAL),
    (2, "remembered command outcomes", OUTCOMES),
    (3, "transactional outbox", OUTBOX),
    (4, "the kind of a unit's last error", ERROR_KINDS),
];

/// Whose fault a unit's last error is (`transient`, `infrastructure`,
/// `data`), kept beside its text so that status and waits read the kind
/// instead of parsing the message.
const ERROR_KINDS: &str = r#"
ALTER TABLE {projections} ADD COLUMN error_kind TEXT;
"#;

/// The transactional outbox: messages enqueued in the application's own
/// transactions, delivered by a relay in id order. SQLite runs one write
/// transaction at a time, so ids are handed out in commit order;
/// `AUTOINCREMENT` keeps an id from being reused after cleanup deleted the
/// newest rows (a reused id could sort behind the relay's cursor). Times in
/// microseconds since the Unix epoch.
const OUTBOX: &str = r#"
CREATE TABLE IF NOT EXISTS {outbox} (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   BLOB    NOT NULL,
    key          TEXT    NOT NULL CHECK (key <> ''),
    topic        TEXT    NOT NULL CHECK (topic <> ''),
    payload      TEXT    NOT NULL,
    headers      TEXT    NOT NULL DEFAULT '{}',
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER
);
"#;

/// The outcome of each command sent with an id (`execute_once`): a claim
/// written with the command's events (`refusal` NULL), or a refusal or an
/// acceptance without events written alone; the first row wins.
/// `recorded_at` in microseconds since the Unix epoch.
const OUTCOMES: &str = r#"
CREATE TABLE IF NOT EXISTS {outcomes} (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    command_id     BLOB    NOT NULL,
    version        INTEGER NOT NULL CHECK (version >= 0),
    refusal        TEXT,
    refusal_json   TEXT,
    recorded_at    INTEGER NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, command_id)
);
CREATE INDEX IF NOT EXISTS {outcomes_idx} ON {outcomes} (recorded_at);
"#;

/// Positions are given by the store (the highest plus one, under the write
/// lock), never reused; `partition_hash` is the FNV-1a hash of the aggregate
/// id that partitioned projections filter on. An event's `recorded_at` is
/// in microseconds since the Unix epoch; other times are RFC 3339 text in UTC.
const INITIAL: &str = r#"
CREATE TABLE IF NOT EXISTS {events} (
    position       INTEGER PRIMARY KEY,
    transaction_id INTEGER NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence >= 0),
    event_type     TEXT    NOT NULL,
    event_version  TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    event_id       BLOB    NOT NULL,
    recorded_at    INTEGER NOT NULL,
    correlation_id BLOB,
    causation_id   BLOB,
    partition_hash INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS {events_stream_idx} ON {events} (aggregate_type, aggregate_id, sequence);
CREATE INDEX IF NOT EXISTS {events_type_idx} ON {events} (aggregate_type, position);

CREATE TABLE IF NOT EXISTS {snapshots} (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version > 0),
    payload        TEXT    NOT NULL,
    taken_at       TEXT    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

CREATE TABLE IF NOT EXISTS {projections} (
    projection     TEXT    NOT NULL,
    partition      INTEGER NOT NULL CHECK (partition >= 0),
    partitions     INTEGER NOT NULL CHECK (partitions > 0),
    transaction_id INTEGER NOT NULL DEFAULT 0,
    position       INTEGER NOT NULL DEFAULT 0,
    epoch          INTEGER NOT NULL DEFAULT 0,
    state          TEXT    NOT NULL DEFAULT 'idle',
    paused         INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    processed      INTEGER NOT NULL DEFAULT 0,
    rebuild_total  INTEGER,
    updated_at     TEXT    NOT NULL,
    PRIMARY KEY (projection, partition)
);

CREATE TABLE IF NOT EXISTS {leases} (
    projection  TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    owner       TEXT,
    lease_until INTEGER,
    PRIMARY KEY (projection, partition)
);

CREATE TABLE IF NOT EXISTS {nodes} (
    node      TEXT    PRIMARY KEY,
    last_seen INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS {dead_letters} (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    projection      TEXT    NOT NULL,
    partition       INTEGER NOT NULL,
    event_id        BLOB    NOT NULL,
    transaction_id  INTEGER NOT NULL,
    position        INTEGER NOT NULL,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    sequence        INTEGER NOT NULL,
    event_type      TEXT    NOT NULL,
    event_version   TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    first_failed_at TEXT    NOT NULL,
    last_failed_at  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS {dead_letters_projection_idx} ON {dead_letters} (projection, id);

CREATE TABLE IF NOT EXISTS {inbox} (
    handler    TEXT NOT NULL,
    message_id TEXT NOT NULL,
    handled_at TEXT NOT NULL,
    PRIMARY KEY (handler, message_id)
);
"#;

/// Applies the pending migrations in one write transaction (`BEGIN
/// IMMEDIATE`: processes opening the file at once apply them once).
pub(super) async fn migrate(writer: &SqlitePool, tables: &Tables) -> Result<(), StoreError> {
    let failed = |version: i64, name: &'static str| {
        move |e: sqlx::Error| StoreError::Migration {
            version: i32::try_from(version).unwrap_or(i32::MAX),
            name,
            source: Box::new(e),
        }
    };
    let mut tx = match writer.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        // Another connection held the file's write lock for longer than
        // the busy timeout: say so, not "migration 0 failed".
        Err(sqlx::Error::Database(e))
            if e.message().contains("locked") || e.code().as_deref() == Some("5") =>
        {
            return Err(StoreError::database(
                "taking the SQLite file's write lock to check its schema (another connection held it past the busy timeout; raise `busy_timeout` or find the long writer)",
                crate::error::ErrorKind::Transient,
                sqlx::Error::Database(e),
            ));
        }
        Err(e) => return Err(failed(0, "begin")(e)),
    };
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS outflow_migrations (
            events_table TEXT    NOT NULL,
            version      INTEGER NOT NULL,
            name         TEXT    NOT NULL,
            applied_at   TEXT    NOT NULL,
            PRIMARY KEY (events_table, version))",
    )
    .execute(&mut *tx)
    .await
    .map_err(failed(0, "migrations ledger"))?;
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM outflow_migrations WHERE events_table = ?1")
            .bind(&tables.events)
            .fetch_all(&mut *tx)
            .await
            .map_err(failed(0, "read ledger"))?;
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        sqlx::raw_sql(&tables.render(sql))
            .execute(&mut *tx)
            .await
            .map_err(failed(version, name))?;
        sqlx::query(
            "INSERT INTO outflow_migrations (events_table, version, name, applied_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(&tables.events)
        .bind(version)
        .bind(name)
        .bind(chrono::Utc::now().to_rfc3339())
        .execute(&mut *tx)
        .await
        .map_err(failed(version, name))?;
        tracing::info!(table = %tables.events, version, name, "applied migration");
    }
    tx.commit().await.map_err(failed(0, "commit"))
}
