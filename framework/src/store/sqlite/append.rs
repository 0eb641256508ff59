//! Appends (the stream's version checked and positions numbered under the
//! write lock) and the other command-side operations.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::{Row, SqliteConnection};

use super::rows::{corrupt, decode_event, time_text, u64_column, COLUMNS};
use super::{db, sqlite_error, to_i64, SqliteStore};
use crate::error::StoreError;
use crate::event::{AppendRequest, RecordedEvent, Snapshot};
use crate::log::partition_hash;
use crate::store::{EventStore, LoadedStream, StreamEvent};

/// The stream's version and the log's last position, in one statement.
const HEADS: &str = "SELECT (SELECT COALESCE(MAX(e.sequence), 0) FROM {events} e \
            WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2) AS version, \
        (SELECT COALESCE(MAX(e.position), 0) FROM {events} e) AS position";
const INSERT: &str =
    "INSERT INTO {events} (position, transaction_id, aggregate_type, aggregate_id, \
     sequence, event_type, event_version, payload, metadata, event_id, recorded_at, \
     correlation_id, causation_id, partition_hash) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";
const READ_STREAM: &str = "SELECT {columns} FROM {events} e \
     WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2 AND e.sequence > ?3 \
     ORDER BY e.sequence LIMIT ?4";
/// A stream for a command in one statement (one state of the file): the
/// snapshot row (kind 0, when asked for), then the events after it (kind 1).
const LOAD: &str = "SELECT 0 AS kind, s.version AS sequence, NULL AS position, \
        NULL AS event_type, NULL AS event_version, s.payload \
       FROM {snapshots} s \
      WHERE ?3 AND s.aggregate_type = ?1 AND s.aggregate_id = ?2 \
     UNION ALL \
     SELECT 1, e.sequence, e.position, e.event_type, e.event_version, e.payload \
       FROM {events} e \
      WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2 \
        AND e.sequence > CASE WHEN ?3 THEN COALESCE((SELECT s.version FROM {snapshots} s \
              WHERE s.aggregate_type = ?1 AND s.aggregate_id = ?2), 0) ELSE 0 END \
     ORDER BY kind, sequence";
const SAVE_SNAPSHOT: &str =
    "INSERT INTO {snapshots} (aggregate_type, aggregate_id, version, payload, taken_at) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
     SET version = excluded.version, payload = excluded.payload, taken_at = excluded.taken_at \
     WHERE excluded.version > {snapshots}.version";

impl SqliteStore {
    fn sql(&self, template: &str) -> String {
        self.inner
            .tables
            .render(&template.replace("{columns}", COLUMNS))
    }

    /// Appends on a connection inside a write transaction: checks the
    /// stream's version, numbers the events after the highest position, and
    /// inserts them. The write lock keeps both checks true until commit.
    pub(super) async fn append_on(
        &self,
        connection: &mut SqliteConnection,
        request: AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let table = &self.inner.tables.events;
        let (actual, last): (i64, i64) = sqlx::query_as(&self.sql(HEADS))
            .bind(&request.aggregate_type)
            .bind(&request.aggregate_id)
            .fetch_one(&mut *connection)
            .await
            .map_err(db("reading the stream's version"))?;
        let actual = u64::try_from(actual).map_err(|_| corrupt(table, "negative sequence"))?;
        if actual != request.expected_version {
            return Err(StoreError::Conflict {
                aggregate_type: request.aggregate_type,
                aggregate_id: request.aggregate_id,
                expected: request.expected_version,
                actual: Some(actual),
            });
        }
        let first = u64::try_from(last).map_err(|_| corrupt(table, "negative position"))? + 1;
        let recorded_at = Utc::now();
        let recorded_micros = recorded_at.timestamp_micros();
        let hash = i64::from(partition_hash(&request.aggregate_id));
        let insert = self.sql(INSERT);
        let AppendRequest {
            aggregate_type,
            aggregate_id,
            expected_version,
            events,
        } = request;
        let mut written = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            let position = first + i as u64;
            let sequence = expected_version + i as u64 + 1;
            let metadata =
                serde_json::to_string(&event.metadata).map_err(|source| StoreError::Serialize {
                    what: "event metadata",
                    aggregate_type: aggregate_type.clone(),
                    aggregate_id: aggregate_id.clone(),
                    source,
                })?;
            let inserted = sqlx::query(&insert)
                .bind(to_i64(position))
                .bind(to_i64(first))
                .bind(&aggregate_type)
                .bind(&aggregate_id)
                .bind(to_i64(sequence))
                .bind(&event.event_type)
                .bind(&event.event_version)
                .bind(event.payload.to_string())
                .bind(metadata)
                .bind(event.event_id)
                .bind(recorded_micros)
                .bind(event.correlation_id)
                .bind(event.causation_id)
                .bind(hash)
                .execute(&mut *connection)
                .await;
            match inserted {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    return Err(StoreError::Conflict {
                        aggregate_type,
                        aggregate_id,
                        expected: expected_version,
                        actual: None,
                    });
                }
                Err(e) => return Err(sqlite_error("appending events", e)),
            }
            written.push(RecordedEvent {
                event_id: event.event_id,
                aggregate_type: aggregate_type.clone(),
                aggregate_id: aggregate_id.clone(),
                sequence,
                position,
                transaction_id: first,
                recorded_at,
                event_type: event.event_type,
                event_version: event.event_version,
                payload: event.payload,
                metadata: event.metadata,
                correlation_id: event.correlation_id,
                causation_id: event.causation_id,
            });
        }
        Ok(written)
    }

    /// Counts an append made inside a caller's transaction.
    pub(super) fn appended_in_transaction(&self) {
        self.inner
            .appends_in_transactions
            .fetch_add(1, Ordering::AcqRel);
    }

    /// After a commit: wakes readers when appends were made in transactions
    /// since the last such wake-up (an early wake-up is followed by the
    /// readers' quick re-checks, so none is lost).
    pub(super) fn appends_committed(&self) {
        let appended = self.inner.appends_in_transactions.load(Ordering::Acquire);
        if self.inner.appends_woken.swap(appended, Ordering::AcqRel) != appended {
            self.signal_commit();
        }
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        if request.events.is_empty() {
            request.validate()?;
            return Ok(Vec::new());
        }
        let mut tx = self
            .inner
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db("starting an append"))?;
        let written = self.append_on(&mut tx, request).await?;
        tx.commit().await.map_err(db("committing an append"))?;
        self.signal_commit();
        Ok(written)
    }

    async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&self.sql(READ_STREAM))
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(to_i64(after_sequence))
            .bind(to_i64(limit as u64))
            .fetch_all(&self.inner.readers)
            .await
            .map_err(db("reading a stream"))?;
        rows.iter()
            .map(|row| decode_event(row, &self.inner.tables.events))
            .collect()
    }

    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        use_snapshot: bool,
    ) -> Result<LoadedStream, StoreError> {
        let table = &self.inner.tables.events;
        let rows = sqlx::query(&self.sql(LOAD))
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(use_snapshot)
            .fetch_all(&self.inner.readers)
            .await
            .map_err(db("loading a stream"))?;
        let mut loaded = LoadedStream::default();
        loaded.events.reserve(rows.len());
        for row in &rows {
            let kind: i64 = row.try_get("kind").map_err(db("loading a stream"))?;
            let sequence = u64_column(row, "sequence", table)?;
            let payload: String = row.try_get("payload").map_err(db("loading a stream"))?;
            if kind == 0 {
                let state = serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt {
                    table: self.inner.tables.companion("snapshots"),
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
                    event_type: row.try_get("event_type").map_err(db("loading a stream"))?,
                    event_version: row
                        .try_get("event_version")
                        .map_err(db("loading a stream"))?,
                    payload,
                });
            }
        }
        Ok(loaded)
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        sqlx::query(&self.sql(SAVE_SNAPSHOT))
            .bind(&snapshot.aggregate_type)
            .bind(&snapshot.aggregate_id)
            .bind(to_i64(snapshot.version))
            .bind(snapshot.state.to_string())
            .bind(time_text(Utc::now()))
            .execute(&self.inner.writer)
            .await
            .map_err(db("saving a snapshot"))?;
        Ok(())
    }
}
