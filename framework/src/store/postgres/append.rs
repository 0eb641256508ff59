//! Appends (one statement each, with the stream's order guard), the
//! diagnosis of a refused append, and the other command-side operations.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;

use super::rows::corrupt;
use super::{pg_error, to_i64, txid_column, u64_column, PostgresStore};
use crate::error::StoreError;
use crate::event::{recorded_events, AppendRequest, RecordedEvent, Snapshot};
use crate::outcome::CommandOutcome;
use crate::port::events::{EventStore, LoadedStream};
use crate::store::sql::rows::loaded_stream;

impl PostgresStore {
    pub(super) async fn append_on(
        &self,
        connection: &mut PgConnection,
        request: AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.append_on_at(connection, request, None).await
    }

    /// Appends inside `tx` at a given time: what a copy of another log
    /// writes (its events keep their times).
    pub(crate) async fn append_copied_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        request: AppendRequest,
        at: DateTime<Utc>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let written = self.append_on_at(tx, request, Some(at)).await?;
        if !written.is_empty() {
            self.appended_in_transaction();
        }
        Ok(written)
    }

    /// Appends on `connection`; the events' time is the statement's, or
    /// `at`.
    async fn append_on_at(
        &self,
        connection: &mut PgConnection,
        request: AppendRequest,
        at: Option<DateTime<Utc>>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let expected = to_i64(request.expected_version);
        let count = request.events.len();
        let mut types = Vec::with_capacity(count);
        let mut versions = Vec::with_capacity(count);
        let mut payloads = Vec::with_capacity(count);
        let mut metadata = Vec::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        let mut correlations = Vec::with_capacity(count);
        let mut causations = Vec::with_capacity(count);
        for event in &request.events {
            types.push(event.event_type.as_str());
            versions.push(event.event_version.as_str());
            payloads.push(event.payload.to_string());
            metadata.push(serde_json::to_string(&event.metadata).map_err(|source| {
                StoreError::Serialize {
                    what: "event metadata",
                    aggregate_type: request.aggregate_type.clone(),
                    aggregate_id: request.aggregate_id.clone(),
                    source,
                }
            })?);
            ids.push(event.event_id);
            correlations.push(event.correlation_id);
            causations.push(event.causation_id);
        }
        let rows = if count == 1 {
            sqlx::query(&self.inner.sql.append_one)
                .bind(&request.aggregate_type)
                .bind(&request.aggregate_id)
                .bind(expected)
                .bind(types[0])
                .bind(versions[0])
                .bind(&payloads[0])
                .bind(&metadata[0])
                .bind(ids[0])
                .bind(correlations[0])
                .bind(causations[0])
                .bind(at)
                .fetch_all(&mut *connection)
                .await
        } else {
            sqlx::query(&self.inner.sql.append)
                .bind(&request.aggregate_type)
                .bind(&request.aggregate_id)
                .bind(expected)
                .bind(&types)
                .bind(&versions)
                .bind(&payloads)
                .bind(&metadata)
                .bind(&ids)
                .bind(&correlations)
                .bind(&causations)
                .bind(at)
                .fetch_all(&mut *connection)
                .await
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                return Err(StoreError::Conflict {
                    aggregate_type: request.aggregate_type,
                    aggregate_id: request.aggregate_id,
                    expected: request.expected_version,
                    actual: None,
                })
            }
            Err(e) => return Err(pg_error("appending events", e)),
        };
        if rows.len() != count {
            return Err(self.refusal(connection, request).await);
        }
        self.recorded(request, &rows)
    }

    /// A request's events as written, from the rows its append returned
    /// (`sequence`, `position`, `txid`, `recorded_at`), each put back in
    /// its slot by sequence.
    pub(super) fn recorded(
        &self,
        request: AppendRequest,
        rows: &[PgRow],
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let count = request.events.len();
        let mut written: Vec<Option<(u64, u64, DateTime<Utc>)>> = vec![None; count];
        for row in rows {
            let sequence = u64_column(row, "sequence", &self.inner.events_table)?;
            let slot = sequence
                .checked_sub(request.expected_version + 1)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i < count)
                .ok_or_else(|| {
                    corrupt(
                        &self.inner.events_table,
                        "append returned a foreign sequence",
                    )
                })?;
            written[slot] = Some((
                u64_column(row, "position", &self.inner.events_table)?,
                txid_column(row, &self.inner.events_table)?,
                row.try_get("recorded_at")
                    .map_err(|e| pg_error("reading appended rows", e))?,
            ));
        }
        recorded_events(
            &request.aggregate_type,
            &request.aggregate_id,
            request.expected_version,
            request.events,
            |i| {
                written[i].ok_or_else(|| {
                    corrupt(&self.inner.events_table, "append returned too few rows")
                })
            },
        )
    }

    /// Says why the append guard refused a write.
    pub(super) async fn refusal(
        &self,
        connection: &mut PgConnection,
        request: AppendRequest,
    ) -> StoreError {
        let head = sqlx::query(&self.inner.sql.stream_head)
            .bind(&request.aggregate_type)
            .bind(&request.aggregate_id)
            .fetch_optional(&mut *connection)
            .await;
        match head {
            Ok(Some(row)) => {
                let actual = row
                    .try_get::<i64, _>("sequence")
                    .ok()
                    .and_then(|s| u64::try_from(s).ok());
                let newer = row.try_get::<bool, _>("newer").unwrap_or(false);
                if actual == Some(request.expected_version) && newer {
                    StoreError::StaleTransaction {
                        aggregate_type: request.aggregate_type,
                        aggregate_id: request.aggregate_id,
                    }
                } else {
                    StoreError::Conflict {
                        aggregate_type: request.aggregate_type,
                        aggregate_id: request.aggregate_id,
                        expected: request.expected_version,
                        actual,
                    }
                }
            }
            Ok(None) => StoreError::Conflict {
                aggregate_type: request.aggregate_type,
                aggregate_id: request.aggregate_id,
                expected: request.expected_version,
                actual: Some(0),
            },
            Err(e) => pg_error("reading the stream head after a refused append", e),
        }
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        Some(PostgresStore::key_ring(self))
    }

    /// Appends in one statement and transaction of its own, or, when
    /// other appends are in flight, with those waiting alongside it in one
    /// statement (each stream checked on its own; see the module `group`).
    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        self.append_grouped(request).await
    }

    async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&self.inner.sql.read_stream)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(to_i64(after_sequence))
            .bind(to_i64(limit as u64))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading a stream", e))?;
        self.decode_rows(rows)
    }

    async fn load(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        use_snapshot: bool,
    ) -> Result<LoadedStream, StoreError> {
        let query = if use_snapshot {
            &self.inner.sql.load_with_snapshot
        } else {
            &self.inner.sql.load
        };
        let rows = sqlx::query(query)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| pg_error("loading a stream", e))?;
        let table = &self.inner.events_table;
        loaded_stream(
            &rows,
            aggregate_type,
            aggregate_id,
            table,
            || table.clone(),
            |e| pg_error("loading a stream", e),
        )
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        sqlx::query(&self.inner.sql.save_snapshot)
            .bind(&snapshot.aggregate_type)
            .bind(&snapshot.aggregate_id)
            .bind(to_i64(snapshot.version))
            .bind(snapshot.state.to_string())
            .execute(&self.inner.pool)
            .await
            .map_err(|e| pg_error("saving a snapshot", e))?;
        Ok(())
    }

    async fn command_outcome(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: uuid::Uuid,
    ) -> Result<Option<CommandOutcome>, StoreError> {
        self.outcome_of(aggregate_type, aggregate_id, command_id)
            .await
    }

    async fn record_outcome(&self, outcome: CommandOutcome) -> Result<CommandOutcome, StoreError> {
        self.store_outcome(outcome).await
    }

    /// Appends and claims the command id in one transaction of its own.
    async fn append_command(
        &self,
        request: AppendRequest,
        command_id: uuid::Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        crate::port::events::append_claiming(self, request, command_id).await
    }

    async fn prune_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.prune(before).await
    }
}
