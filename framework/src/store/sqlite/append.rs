//! Appends (the stream's version checked and positions numbered under the
//! write lock) and the other command-side operations.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection};

use super::rows::{corrupt, decode_event, time_text};
use super::{db, sqlite_error, to_i64, SqliteStore};
use crate::error::StoreError;
use crate::event::{recorded_events, AppendRequest, RecordedEvent, Snapshot};
use crate::outcome::CommandOutcome;
use crate::port::events::{EventStore, LoadedStream};
use crate::port::log::partition_hash;
use crate::store::sql::rows::loaded_stream;

/// Events per INSERT statement: 8 bound values each, far below SQLite's
/// limit of 32,766 variables per statement.
pub(super) const CHUNK: usize = 256;
/// The values bound once per statement, before each event's 8.
const FIXED_PARAMETERS: usize = 7;

/// One INSERT for `rows` events of one stream that checks the stream's
/// version, numbers the events after the log's highest position and returns
/// their positions — no row at all when the version is not the expected one.
///
/// `?3` is the expected version of the whole append and `?4` the number of
/// its events written by earlier statements of the same append (the version
/// checked is `?3 + ?4`); `?5` is the append's transaction id once the first
/// statement fixed it (NULL for the first: the first event's position).
/// Each event's values start with its 1-based index in the whole append.
/// SQLite runs the SELECT to completion before inserting (its target table
/// is read), so the subqueries see the log as it was before the statement.
/// The highest position and sequence are read as `ORDER BY … DESC LIMIT 1`
/// on their indexes: SQLite optimizes a bare `MAX(x)` that way but not one
/// inside `COALESCE`, which scans the table.
fn insert_statement(rows: usize) -> String {
    let mut values = String::with_capacity(rows * 48);
    for row in 0..rows {
        let base = FIXED_PARAMETERS + row * 8;
        if row > 0 {
            values.push_str(", ");
        }
        values.push('(');
        for column in 1..=8 {
            if column > 1 {
                values.push_str(", ");
            }
            values.push('?');
            values.push_str(&(base + column).to_string());
        }
        values.push(')');
    }
    format!(
        "INSERT INTO {{events}} (position, transaction_id, aggregate_type, aggregate_id, \
         sequence, event_type, event_version, payload, metadata, event_id, recorded_at, \
         correlation_id, causation_id, partition_hash) \
         SELECT h.last + v.column1 - ?4, COALESCE(?5, h.last + 1), ?1, ?2, ?3 + v.column1, \
                v.column2, v.column3, v.column4, v.column5, v.column6, ?6, v.column7, \
                v.column8, ?7 \
           FROM (VALUES {values}) v, \
                (SELECT COALESCE((SELECT e.position FROM {{events}} e \
                                  ORDER BY e.position DESC LIMIT 1), 0) AS last) h \
          WHERE COALESCE((SELECT e.sequence FROM {{events}} e \
                  WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2 \
                  ORDER BY e.sequence DESC LIMIT 1), 0) = ?3 + ?4 \
         RETURNING position"
    )
}

impl SqliteStore {
    pub(super) async fn append_on(
        &self,
        connection: &mut SqliteConnection,
        request: AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.append_on_at(connection, request, None).await
    }

    /// Appends inside `tx` at a given time: what a copy of another log
    /// writes (its events keep their times).
    pub(crate) async fn append_copied_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        request: AppendRequest,
        at: DateTime<Utc>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let written = self.append_on_at(tx, request, Some(at)).await?;
        if !written.is_empty() {
            self.appended_in_transaction();
        }
        Ok(written)
    }

    /// Appends on a connection inside a write transaction (or, for an
    /// append of at most [`CHUNK`] events, on the writer outside any: one
    /// statement is its own transaction). Each statement checks the stream's
    /// version and numbers its events after the highest position; the write
    /// lock keeps both true until commit.
    pub(super) async fn append_on_at(
        &self,
        connection: &mut SqliteConnection,
        request: AppendRequest,
        at: Option<DateTime<Utc>>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let table = &self.inner.tables.events;
        // Stored in microseconds: what the append returns is what the log
        // will say.
        let recorded_micros = at.unwrap_or_else(Utc::now).timestamp_micros();
        let recorded_at = DateTime::from_timestamp_micros(recorded_micros).unwrap_or_default();
        let hash = i64::from(partition_hash(&request.aggregate_id));
        let AppendRequest {
            aggregate_type,
            aggregate_id,
            expected_version,
            events,
        } = request;
        let mut metadata = Vec::with_capacity(events.len());
        for event in &events {
            metadata.push(serde_json::to_string(&event.metadata).map_err(|source| {
                StoreError::Serialize {
                    what: "event metadata",
                    aggregate_type: aggregate_type.clone(),
                    aggregate_id: aggregate_id.clone(),
                    source,
                }
            })?);
        }
        let mut transaction_id: Option<u64> = None;
        let mut first_positions = Vec::new();
        let mut done = 0usize;
        for chunk in events.chunks(CHUNK) {
            let sql = self.inner.queries.insert(chunk.len(), insert_statement);
            let mut query = sqlx::query(&sql)
                .bind(&aggregate_type)
                .bind(&aggregate_id)
                .bind(to_i64(expected_version))
                .bind(to_i64(done as u64))
                .bind(transaction_id.map(to_i64))
                .bind(recorded_micros)
                .bind(hash);
            for (i, event) in chunk.iter().enumerate() {
                query = query
                    .bind(to_i64((done + i + 1) as u64))
                    .bind(&event.event_type)
                    .bind(&event.event_version)
                    .bind(event.payload.to_string())
                    .bind(&metadata[done + i])
                    .bind(event.event_id)
                    .bind(event.correlation_id)
                    .bind(event.causation_id);
            }
            let rows = match query.fetch_all(&mut *connection).await {
                Ok(rows) => rows,
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    return Err(StoreError::Conflict {
                        aggregate_type,
                        aggregate_id,
                        expected: expected_version,
                        actual: None,
                    });
                }
                Err(e) => return Err(sqlite_error("appending events", e)),
            };
            if rows.is_empty() {
                let actual: i64 = sqlx::query_scalar(&self.inner.queries.version)
                    .bind(&aggregate_type)
                    .bind(&aggregate_id)
                    .fetch_one(&mut *connection)
                    .await
                    .map_err(db("reading the stream's version"))?;
                let actual =
                    u64::try_from(actual).map_err(|_| corrupt(table, "negative sequence"))?;
                return Err(StoreError::Conflict {
                    aggregate_type,
                    aggregate_id,
                    expected: expected_version,
                    actual: Some(actual),
                });
            }
            let mut lowest = i64::MAX;
            for row in &rows {
                lowest = lowest.min(row.try_get::<i64, _>(0).map_err(db("appending events"))?);
            }
            if rows.len() != chunk.len() {
                return Err(corrupt(table, "an append wrote fewer rows than events"));
            }
            let first = u64::try_from(lowest).map_err(|_| corrupt(table, "negative position"))?;
            transaction_id.get_or_insert(first);
            first_positions.push(first);
            done += chunk.len();
        }
        let transaction_id = transaction_id.unwrap_or_default();
        recorded_events(
            &aggregate_type,
            &aggregate_id,
            expected_version,
            events,
            |i| {
                let first = first_positions[i / CHUNK];
                Ok((first + (i % CHUNK) as u64, transaction_id, recorded_at))
            },
        )
    }

    /// Counts an append made inside a caller's transaction (see
    /// [`AppendWakes`](crate::store::sql::wakes::AppendWakes)).
    pub(super) fn appended_in_transaction(&self) {
        self.inner.append_wakes.appended();
    }

    /// After a commit: wakes readers when appends were made in transactions
    /// since the last such wake-up (an early wake-up is followed by the
    /// readers' quick re-checks, so none is lost).
    pub(super) fn appends_committed(&self) {
        if self.inner.append_wakes.committed() {
            self.signal_commit();
        }
    }
}

impl SqliteStore {
    /// One append with the writer to itself: one statement (its own
    /// transaction) for up to [`CHUNK`] events, a transaction otherwise.
    pub(super) async fn append_alone(
        &self,
        request: AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if request.events.is_empty() {
            request.validate()?;
            return Ok(Vec::new());
        }
        if request.events.len() <= CHUNK {
            // One statement, its own transaction: no BEGIN and COMMIT round
            // trips to SQLite's thread.
            let mut writer = self
                .inner
                .writer
                .acquire()
                .await
                .map_err(db("starting an append"))?;
            let written = self.append_on(&mut writer, request).await?;
            self.signal_commit();
            return Ok(written);
        }
        let mut tx = super::projection_store::begin_immediate(&self.inner.writer)
            .await
            .map_err(db("starting an append"))?;
        let written = self.append_on(&mut tx, request).await?;
        tx.commit().await.map_err(db("committing an append"))?;
        self.signal_commit();
        Ok(written)
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        Some(SqliteStore::key_ring(self))
    }

    /// Appends at once when the writer is free; while it writes another
    /// append, with the appends that arrive meanwhile, in one transaction
    /// (see the group commit of this backend).
    async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, StoreError> {
        self.append_grouped(request, None).await
    }

    async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&self.inner.queries.read_stream)
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
        let sql = &self.inner.queries.load;
        let query = sqlx::query(sql)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(use_snapshot);
        // The store's own loading connection when it is free, else one of
        // the pool's (concurrent commands).
        let mut loader = self.inner.loader.try_lock().ok();
        let rows = match loader.as_deref_mut().and_then(Option::as_mut) {
            Some(connection) => query.fetch_all(connection).await,
            None => query.fetch_all(&self.inner.readers).await,
        }
        .map_err(db("loading a stream"))?;
        drop(loader);
        loaded_stream(
            &rows,
            aggregate_type,
            aggregate_id,
            table,
            || self.inner.tables.companion("snapshots"),
            |e| sqlite_error("loading a stream", e),
        )
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        sqlx::query(&self.inner.queries.save_snapshot)
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

    /// Appends and claims the command id in one write transaction.
    async fn append_command(
        &self,
        request: AppendRequest,
        command_id: uuid::Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.append_grouped(request, Some(command_id)).await
    }

    async fn prune_outcomes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.prune(before).await
    }
}
