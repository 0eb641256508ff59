//! Decoding rows of the events table into [`RecordedEvent`]s, with typed
//! errors for values Outflow cannot represent.

use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::{pg_error, PostgresStore};
use crate::error::StoreError;
use crate::event::{decode_window, RecordedEvent};
use crate::store::sql::rows::StoredRow;

impl PostgresStore {
    /// Decodes every row; the first that does not decode fails the read
    /// (a stream, where the aggregate needs every event).
    pub(super) fn decode_rows(&self, rows: Vec<PgRow>) -> Result<Vec<RecordedEvent>, StoreError> {
        rows.iter()
            .map(|row| decode_event(row, &self.inner.events_table))
            .collect()
    }

    /// Decodes a window of the global log (see
    /// [`decode_window`](crate::event::decode_window)).
    pub(super) fn decode_window(&self, rows: Vec<PgRow>) -> Result<Vec<RecordedEvent>, StoreError> {
        decode_window(&rows, |row| decode_event(row, &self.inner.events_table))
    }
}

/// Decodes one row. Payload and metadata arrive as their stored text and
/// are parsed here, row by row, so one value that `serde_json` refuses
/// names its event instead of failing the whole query.
pub(super) fn decode_event(row: &PgRow, table: &str) -> Result<RecordedEvent, StoreError> {
    let get_err = |e: sqlx::Error| pg_error("decoding an event row", e);
    let aggregate_type: String = row.try_get("aggregate_type").map_err(get_err)?;
    let aggregate_id: String = row.try_get("aggregate_id").map_err(get_err)?;
    let sequence = u64_column(row, "sequence", table)?;
    let position = u64_column(row, "position", table)?;
    let event_type: String = row.try_get("event_type").map_err(get_err)?;
    let event_version: String = row.try_get("event_version").map_err(get_err)?;
    let event_id: Uuid = row.try_get("event_id").map_err(get_err)?;
    let transaction_id = txid_column(row, table)?;
    let payload: String = row.try_get("payload").map_err(get_err)?;
    let metadata: Option<String> = row.try_get("metadata").map_err(get_err)?;
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
        recorded_at: row.try_get("recorded_at").map_err(get_err)?,
        correlation_id: row.try_get("correlation_id").map_err(get_err)?,
        causation_id: row.try_get("causation_id").map_err(get_err)?,
    }
    .decode()
}

pub(super) fn u64_column(
    row: &PgRow,
    column: &'static str,
    table: &str,
) -> Result<u64, StoreError> {
    crate::store::sql::rows::u64_column(row, column, table, |e| {
        pg_error("decoding an event row", e)
    })
}

pub(super) fn txid_column(row: &PgRow, table: &str) -> Result<u64, StoreError> {
    let text: String = row
        .try_get("txid")
        .map_err(|e| pg_error("decoding an event row", e))?;
    text.parse()
        .map_err(|_| corrupt(table, &format!("transaction id `{text}` is not a number")))
}

pub(super) use crate::store::sql::rows::corrupt;
