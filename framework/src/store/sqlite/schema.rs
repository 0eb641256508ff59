//! Table names and versioned migrations for SQLite, recorded per events
//! table in `outflow_migrations` like the PostgreSQL backend's.

use sqlx::SqlitePool;

use crate::error::StoreError;
use crate::names::Identifier;
use crate::store::sql::statements::Placeholders;

/// The store's tables, validated and quoted for SQL.
#[derive(Debug, Clone)]
pub(super) struct Tables {
    /// The events table as configured (unquoted).
    pub(super) events: String,
    placeholders: Placeholders,
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
            ("{timers_due_idx}", "timers_due_idx", "timers index"),
            (
                "{timers_finished_idx}",
                "timers_finished_idx",
                "timers index",
            ),
            ("{timers}", "timers", "timers table"),
            ("{tags}", "tags", "tags table"),
            ("{keys}", "keys", "keys table"),
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
            placeholders: Placeholders::new(replacements),
        })
    }

    /// `sql` with the table placeholders replaced.
    pub(super) fn render(&self, sql: &str) -> String {
        self.placeholders.render(sql)
    }

    /// The unquoted name of a companion table (`projections`, `leases`, ...).
    pub(super) fn companion(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.events)
    }
}

/// The migrations, in order: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial schema",
        include_str!("migrations/001_initial.sql"),
    ),
    (
        2,
        "remembered command outcomes",
        include_str!("migrations/002_outcomes.sql"),
    ),
    (
        3,
        "transactional outbox",
        include_str!("migrations/003_outbox.sql"),
    ),
    (
        4,
        "the kind of a unit's last error",
        include_str!("migrations/004_error_kinds.sql"),
    ),
    (
        5,
        "operators' requests: rebuilds and retries",
        include_str!("migrations/005_requests.sql"),
    ),
    (
        6,
        "durable timers",
        include_str!("migrations/006_timers.sql"),
    ),
    (7, "event tags", include_str!("migrations/007_tags.sql")),
    (
        8,
        "data subjects' keys",
        include_str!("migrations/008_keys.sql"),
    ),
];

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
