//! Decoding rows of the events table into [`RecordedEvent`]s.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::db;
use crate::error::StoreError;
use crate::event::RecordedEvent;
use crate::store::sql::rows::StoredRow;

/// The columns every event read selects, in `decode_event`'s names.
pub(super) const COLUMNS: &str = "e.position, e.transaction_id, e.aggregate_type, e.aggregate_id, \
     e.sequence, e.event_type, e.event_version, e.payload, e.metadata, e.event_id, \
     e.recorded_at, e.correlation_id, e.causation_id";

/// Decodes one row; payload and metadata are parsed here, so one that
/// `serde_json` refuses names its event.
pub(super) fn decode_event(row: &SqliteRow, table: &str) -> Result<RecordedEvent, StoreError> {
    let get = db("decoding an event row");
    let aggregate_type: String = row.try_get("aggregate_type").map_err(get)?;
    let aggregate_id: String = row
        .try_get("aggregate_id")
        .map_err(db("decoding an event row"))?;
    let sequence = u64_column(row, "sequence", table)?;
    let position = u64_column(row, "position", table)?;
    let transaction_id = u64_column(row, "transaction_id", table)?;
    let event_type: String = row
        .try_get("event_type")
        .map_err(db("decoding an event row"))?;
    let event_version: String = row
        .try_get("event_version")
        .map_err(db("decoding an event row"))?;
    let event_id: Uuid = row
        .try_get("event_id")
        .map_err(db("decoding an event row"))?;
    let payload: &str = row
        .try_get("payload")
        .map_err(db("decoding an event row"))?;
    let metadata: Option<&str> = row
        .try_get("metadata")
        .map_err(db("decoding an event row"))?;
    let recorded_at: i64 = row
        .try_get("recorded_at")
        .map_err(db("decoding an event row"))?;
    StoredRow {
        event_id,
        transaction_id,
        position,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        payload,
        metadata,
        recorded_at: micros_column(recorded_at, table)?,
        correlation_id: row
            .try_get("correlation_id")
            .map_err(db("decoding an event row"))?,
        causation_id: row
            .try_get("causation_id")
            .map_err(db("decoding an event row"))?,
    }
    .decode()
}

/// A non-negative integer column.
pub(super) fn u64_column(
    row: &SqliteRow,
    column: &'static str,
    table: &str,
) -> Result<u64, StoreError> {
    crate::store::sql::rows::u64_column(row, column, table, db("decoding a row"))
}

/// A time in microseconds since the Unix epoch (an event's `recorded_at`).
pub(super) fn micros_column(micros: i64, table: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| corrupt(table, &format!("{micros} µs is not a time")))
}

/// An RFC 3339 time as the store writes it.
pub(super) fn time_column(text: &str, table: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| corrupt(table, &format!("`{text}` is not an RFC 3339 time")))
}

/// A time as the store writes it: RFC 3339 in UTC with microseconds, so
/// that text order is time order.
pub(super) fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub(super) use crate::store::sql::rows::corrupt;
