//! The schema: validated table names, SQL rendered with them, and the
//! versioned migrations (serialized across processes by an advisory lock).

use sqlx::postgres::PgPool;

use crate::error::StoreError;
use crate::names::Identifier;
use crate::store::sql::statements::Placeholders;

/// Schema migrations, applied in order, each once per events table.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "events table with a gap-safe global log",
        include_str!("migrations/001_events_log.sql"),
    ),
    (
        2,
        "projection state, nodes, dead letters, inbox",
        include_str!("migrations/002_projections.sql"),
    ),
    (
        3,
        "transactional outbox",
        include_str!("migrations/003_outbox.sql"),
    ),
    (
        4,
        "dead letters of broker messages",
        include_str!("migrations/004_message_dead_letters.sql"),
    ),
    (
        5,
        "leases in a table of their own",
        include_str!("migrations/005_leases.sql"),
    ),
    (
        6,
        "remembered command outcomes",
        include_str!("migrations/006_outcomes.sql"),
    ),
    (
        7,
        "the kind of a unit's last error",
        include_str!("migrations/007_error_kinds.sql"),
    ),
    (
        8,
        "operators' requests: rebuilds and retries",
        include_str!("migrations/008_requests.sql"),
    ),
    (
        9,
        "durable timers",
        include_str!("migrations/009_timers.sql"),
    ),
    (10, "event tags", include_str!("migrations/010_tags.sql")),
    (
        11,
        "data subjects' keys",
        include_str!("migrations/011_keys.sql"),
    ),
    (
        12,
        "nodes' presence locks",
        include_str!("migrations/012_presence.sql"),
    ),
];

/// Key of the advisory lock that serializes concurrent migrations.
const MIGRATION_LOCK: i64 = 0x6f75_7466_6c6f_7701;

/// The validated names of every table and index a store uses, and the
/// rendering of SQL templates with them.
#[derive(Debug, Clone)]
pub(super) struct Names {
    pub(super) events: Identifier,
    placeholders: Placeholders,
}

impl Names {
    pub(super) fn new(
        events_table: &str,
        snapshots_table: Option<&str>,
    ) -> Result<Self, StoreError> {
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
        let leases = events.derived("leases", "leases table")?.quoted();
        let inbox = events.derived("inbox", "inbox table")?.quoted();
        let outbox = events.derived("outbox", "outbox table")?.quoted();
        let outbox_log_idx = unqualified(events.derived("ob_log_idx", "outbox log index name")?);
        let outbox_key_idx = unqualified(events.derived("ob_key_idx", "outbox key index name")?);
        let dead_messages = events
            .derived("dead_messages", "dead messages table")?
            .quoted();
        let outcomes = events.derived("outcomes", "outcomes table")?.quoted();
        let outcomes_idx = unqualified(events.derived("oc_idx", "outcomes index name")?);
        let timers = events.derived("timers", "timers table")?.quoted();
        let tags = events.derived("tags", "tags table")?.quoted();
        let keys = events.derived("keys", "keys table")?.quoted();
        let timers_due_idx = unqualified(events.derived("tm_due_idx", "timers index name")?);
        let timers_finished_idx = unqualified(events.derived("tm_done_idx", "timers index name")?);
        let replacements = vec![
            // Before `{nodes}`, which it names.
            (
                "{gone_nodes}",
                query_fragment(include_str!("queries/gone_nodes.sql")),
            ),
            (
                "{columns}",
                include_str!("queries/columns.sql").trim_end().to_owned(),
            ),
            (
                "{append_guard}",
                query_fragment(include_str!("queries/append_guard.sql")),
            ),
            ("{events_log_idx}", log_idx),
            ("{events_type_log_idx}", type_log_idx),
            ("{dead_letters_projection_idx}", dead_letters_idx),
            ("{leases}", leases),
            ("{outcomes_recorded_idx}", outcomes_idx),
            ("{outcomes}", outcomes),
            (
                "{timer_columns}",
                include_str!("queries/timers/columns.sql")
                    .trim_end()
                    .to_owned(),
            ),
            ("{timers_due_idx}", timers_due_idx),
            ("{timers_finished_idx}", timers_finished_idx),
            ("{timers}", timers),
            ("{tags}", tags),
            ("{keys}", keys),
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
            placeholders: Placeholders::new(replacements),
        })
    }

    pub(super) fn render(&self, sql: &str) -> String {
        self.placeholders.render(sql)
    }
}

pub(super) async fn migrate(pool: &PgPool, names: &Names) -> Result<(), StoreError> {
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

/// A query fragment to put inside another statement: its comment lines
/// dropped (they document the file, not the statement it lands in).
fn query_fragment(sql: &str) -> String {
    sql.lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}
