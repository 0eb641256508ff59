//! The global log on SQLite: positions in commit order (one writer at a
//! time), so reads resume with a plain `position >` and need no horizon.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteArguments;
use sqlx::{Row, Sqlite};
use uuid::Uuid;

use super::rows::{corrupt, micros_column, u64_column};
use super::{db, to_i64, SqliteStore};
use crate::error::StoreError;
use crate::event::{decode_window, Checkpoint, RecordedEvent};
use crate::port::log::{EventLog, LogFilter};
use crate::store::sql::rows::StoredRow;
use crate::wake::Wakeups;

/// A window of the log as one JSON array of rows (see the statement's
/// comment for why).
const READ_LOG: &str = include_str!("queries/read_log.sql");

/// One row of [`READ_LOG`]'s array.
type WindowRow = (
    i64,
    i64,
    String,
    String,
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    Option<String>,
    Option<String>,
);
const COUNT: &str = include_str!("queries/count_events.sql");
const FIRST_PENDING: &str = include_str!("queries/first_pending.sql");

/// A value bound for a [`filter_sql`] clause.
enum Bind {
    Text(String),
    Int(i64),
}

/// The `AND ...` conditions for a filter, numbering parameters from `first`.
fn filter_sql(filter: &LogFilter, first: usize) -> (String, Vec<Bind>) {
    let mut clause = String::new();
    let mut binds = Vec::new();
    let mut next = first;
    let mut list = |column: &str, values: &[String], binds: &mut Vec<Bind>| {
        let params: Vec<String> = values
            .iter()
            .map(|value| {
                binds.push(Bind::Text(value.clone()));
                next += 1;
                format!("?{}", next - 1)
            })
            .collect();
        format!(" AND e.{column} IN ({})", params.join(", "))
    };
    if !filter.aggregate_type_list().is_empty() {
        let sql = list("aggregate_type", filter.aggregate_type_list(), &mut binds);
        clause.push_str(&sql);
    }
    if !filter.event_type_list().is_empty() {
        let sql = list("event_type", filter.event_type_list(), &mut binds);
        clause.push_str(&sql);
    }
    if let Some(partition) = filter.partition() {
        let count = first + binds.len();
        binds.push(Bind::Int(i64::from(partition.count)));
        binds.push(Bind::Int(i64::from(partition.index)));
        clause.push_str(&format!(
            " AND e.partition_hash % ?{count} = ?{}",
            count + 1
        ));
    }
    if let Some(query) = filter.query() {
        // `{tags}` is rendered with the statement's other tables.
        let mut params = super::decisions::Params::new(first + binds.len());
        let matching = super::decisions::query_clause(query, "e", "{tags}", &mut params);
        binds.extend(params.binds.into_iter().map(Bind::Text));
        clause.push_str(&format!(" AND {matching}"));
    }
    (clause, binds)
}

fn bind_filter<'q>(
    mut query: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>> {
    for bind in binds {
        query = match bind {
            Bind::Text(value) => query.bind(value),
            Bind::Int(value) => query.bind(value),
        };
    }
    query
}

/// An event from a row of [`READ_LOG`]'s array.
fn window_event(row: WindowRow, table: &str) -> Result<RecordedEvent, StoreError> {
    let (
        position,
        transaction_id,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        payload,
        metadata,
        event_id,
        recorded_at,
        correlation_id,
        causation_id,
    ) = row;
    let unsigned = |value: i64, what: &str| {
        u64::try_from(value).map_err(|_| corrupt(table, &format!("negative {what} {value}")))
    };
    let uuid = |hex: &str| {
        Uuid::try_parse(hex).map_err(|_| corrupt(table, &format!("`{hex}` is not an event id")))
    };
    let optional_uuid = |hex: Option<String>| match hex.as_deref() {
        None | Some("") => Ok(None),
        Some(hex) => uuid(hex).map(Some),
    };
    let position = unsigned(position, "position")?;
    let transaction_id = unsigned(transaction_id, "transaction id")?;
    let sequence = unsigned(sequence, "sequence")?;
    let event_id = uuid(&event_id)?;
    StoredRow {
        event_id,
        transaction_id,
        position,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        payload: &payload,
        metadata: metadata.as_deref(),
        recorded_at: micros_column(recorded_at, table)?,
        correlation_id: optional_uuid(correlation_id)?,
        causation_id: optional_uuid(causation_id)?,
    }
    .decode()
}

#[async_trait]
impl EventLog for SqliteStore {
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        Some(SqliteStore::key_ring(self))
    }

    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let (clause, binds) = filter_sql(filter, 3);
        let sql = self.inner.queries.with_filter(READ_LOG, &clause);
        let query = sqlx::query(&sql)
            .bind(to_i64(after.position))
            .bind(to_i64(limit as u64));
        let row = bind_filter(query, binds)
            .fetch_one(&self.inner.readers)
            .await
            .map_err(db("reading the global log"))?;
        let table = &self.inner.tables.events;
        let array: &str = row.try_get(0).map_err(db("reading the global log"))?;
        let mut rows: Vec<WindowRow> = serde_json::from_str(array)
            .map_err(|e| corrupt(table, &format!("a window of the log is not JSON: {e}")))?;
        // The array's order is the subquery's; sorting makes it certain.
        rows.sort_unstable_by_key(|row| row.0);
        decode_window(rows, |row| window_event(row, table))
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        let row = sqlx::query(&self.inner.queries.head)
            .fetch_optional(&self.inner.readers)
            .await
            .map_err(db("reading the head of the log"))?;
        let table = &self.inner.tables.events;
        match row {
            None => Ok(Checkpoint::START),
            Some(row) => Ok(Checkpoint::new(
                u64_column(&row, "transaction_id", table)?,
                u64_column(&row, "position", table)?,
            )),
        }
    }

    fn wakeups(&self) -> Wakeups {
        self.inner.wake.subscribe(self.inner.poll_interval)
    }

    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let (clause, binds) = filter_sql(filter, 4);
        let sql = self.inner.queries.with_filter(COUNT, &clause);
        let mut query = sqlx::query_scalar::<_, i64>(&sql)
            .bind(to_i64(after.position))
            .bind(to_i64(upto.position))
            .bind(to_i64(cap));
        for bind in binds {
            query = match bind {
                Bind::Text(value) => query.bind(value),
                Bind::Int(value) => query.bind(value),
            };
        }
        let count = query
            .fetch_one(&self.inner.readers)
            .await
            .map_err(db("counting events"))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let (clause, binds) = filter_sql(filter, 2);
        let sql = self.inner.queries.with_filter(FIRST_PENDING, &clause);
        let mut query = sqlx::query_scalar::<_, i64>(&sql).bind(to_i64(after.position));
        for bind in binds {
            query = match bind {
                Bind::Text(value) => query.bind(value),
                Bind::Int(value) => query.bind(value),
            };
        }
        let micros = query
            .fetch_optional(&self.inner.readers)
            .await
            .map_err(db("reading the oldest pending event"))?;
        micros
            .map(|micros| micros_column(micros, &self.inner.tables.events))
            .transpose()
    }
}
