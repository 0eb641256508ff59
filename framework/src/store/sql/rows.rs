//! Event rows as [`RecordedEvent`]s, integer columns as Outflow's unsigned
//! values, and the error for a stored value Outflow cannot represent.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use crate::error::{EventRef, StoreError};
use crate::event::{Metadata, RecordedEvent, Snapshot};
use crate::port::events::{LoadedStream, StreamEvent};

/// An event row's columns as a SQL backend reads them (each its own way),
/// payload and metadata still their stored JSON text.
pub(crate) struct StoredRow<'a> {
    pub(crate) event_id: Uuid,
    pub(crate) transaction_id: u64,
    pub(crate) position: u64,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) sequence: u64,
    pub(crate) event_type: String,
    pub(crate) event_version: String,
    pub(crate) payload: &'a str,
    pub(crate) metadata: Option<&'a str>,
    pub(crate) recorded_at: DateTime<Utc>,
    pub(crate) correlation_id: Option<Uuid>,
    pub(crate) causation_id: Option<Uuid>,
}

impl StoredRow<'_> {
    /// The event, its payload and metadata parsed here, row by row, so one
    /// value that `serde_json` refuses names its event
    /// ([`StoreError::Undecodable`]) instead of failing a whole read.
    pub(crate) fn decode(self) -> Result<RecordedEvent, StoreError> {
        let undecodable = |what: &'static str, source: serde_json::Error| StoreError::Undecodable {
            event: Box::new(EventRef {
                aggregate_type: self.aggregate_type.clone(),
                aggregate_id: self.aggregate_id.clone(),
                sequence: self.sequence,
                position: Some(self.position),
                event_type: self.event_type.clone(),
                event_version: self.event_version.clone(),
            }),
            event_id: self.event_id,
            transaction_id: self.transaction_id,
            what,
            source,
        };
        let payload = serde_json::from_str(self.payload).map_err(|e| undecodable("payload", e))?;
        let metadata = match self.metadata {
            None => Metadata::new(),
            Some(text) => serde_json::from_str::<Option<Metadata>>(text)
                .map_err(|e| undecodable("metadata", e))?
                .unwrap_or_default(),
        };
        Ok(RecordedEvent {
            event_id: self.event_id,
            transaction_id: self.transaction_id,
            recorded_at: self.recorded_at,
            payload,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            position: self.position,
            event_type: self.event_type,
            event_version: self.event_version,
            metadata,
        })
    }
}

/// A non-negative integer column; a negative value is a corrupt row of
/// `table`, a column that cannot be read is `failed`'s database error.
pub(crate) fn u64_column<R>(
    row: &R,
    column: &'static str,
    table: &str,
    failed: impl FnOnce(sqlx::Error) -> StoreError,
) -> Result<u64, StoreError>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    &'static str: ColumnIndex<R>,
{
    let value: i64 = row.try_get(column).map_err(failed)?;
    u64::try_from(value).map_err(|_| corrupt(table, &format!("negative {column} {value}")))
}

/// A stored value of `table` that Outflow cannot represent.
pub(crate) fn corrupt(table: &str, what: &str) -> StoreError {
    StoreError::Corrupt {
        table: table.to_owned(),
        what: what.to_owned(),
    }
}

/// A stream from the rows of a backend's `load` statement: the snapshot row
/// (`kind` 0) when there is one, then the events after it (`kind` 1), each
/// row `kind, sequence, position, event_type, event_version, payload`.
/// A snapshot that is not JSON is a corrupt row of `snapshots_table()`.
pub(crate) fn loaded_stream<R>(
    rows: &[R],
    aggregate_type: &str,
    aggregate_id: &str,
    events_table: &str,
    snapshots_table: impl Fn() -> String,
    failed: impl Fn(sqlx::Error) -> StoreError,
) -> Result<LoadedStream, StoreError>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    &'static str: ColumnIndex<R>,
{
    let mut loaded = LoadedStream::default();
    loaded.events.reserve(rows.len());
    for row in rows {
        let kind: i64 = row.try_get("kind").map_err(&failed)?;
        let sequence = u64_column(row, "sequence", events_table, &failed)?;
        let payload: String = row.try_get("payload").map_err(&failed)?;
        if kind == 0 {
            let state = serde_json::from_str(&payload).map_err(|e| {
                corrupt(
                    &snapshots_table(),
                    &format!("snapshot of {aggregate_type} `{aggregate_id}` is not JSON: {e}"),
                )
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
                position: u64_column(row, "position", events_table, &failed)?,
                event_type: row.try_get("event_type").map_err(&failed)?,
                event_version: row.try_get("event_version").map_err(&failed)?,
                payload,
            });
        }
    }
    Ok(loaded)
}

/// The retries asked for, from `(projection, partition, id)` rows of the
/// dead-letters table `table`; a negative or oversized value is a corrupt
/// row, not one to skip.
pub(crate) fn retry_requests(
    rows: Vec<(String, i64, i64)>,
    table: &str,
) -> Result<Vec<(crate::port::projections::UnitId, u64)>, StoreError> {
    rows.into_iter()
        .map(|(projection, partition, id)| {
            let partition = u32::try_from(partition)
                .map_err(|_| corrupt(table, &format!("partition {partition} out of range")))?;
            let id = u64::try_from(id).map_err(|_| corrupt(table, &format!("negative id {id}")))?;
            Ok((
                crate::port::projections::UnitId {
                    projection,
                    partition,
                },
                id,
            ))
        })
        .collect()
}
