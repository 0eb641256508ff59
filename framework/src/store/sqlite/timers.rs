//! Timers on SQLite, in `<events table>_timers`: times in microseconds by
//! this machine's clock (the embedded database's), the window a range scan
//! of a partial index on the due time of pending timers. Schedules run in
//! the caller's write transaction, finishes on the writer connection.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Row, Sqlite, Transaction};
use uuid::Uuid;

use super::projection_store::begin_immediate;
use super::rows::micros_column;
use super::{db, to_i64, SqliteStore};
use crate::error::{ConfigError, StoreError};
use crate::event::Checkpoint;
use crate::port::timers::{
    Due, DueWindow, Finish, NewTimer, Scheduled, TimerCounts, TimerQuery, TimerRecord, TimerState,
    TimerStore,
};
use crate::store::sql::timers::{
    counts_from, decode_metadata, encode_metadata, finish_columns, micros, source_columns,
    timer_state,
};

crate::store::sql::statements::sql_statements! {
    /// The timers' statements, one `.sql` file each under `queries/timers/`.
    pub(super) struct TimerQueries in "queries/timers/" {
        schedule,
        previous_state,
        cancel,
        due,
        finish,
        attempt,
        still_pending,
        bump_source,
        get,
        list,
        counts,
        retry,
        prune,
        exists,
    }
}

/// The clock, moved by `offset`, in microseconds.
fn now_micros(offset: Duration) -> i64 {
    Utc::now().timestamp_micros().saturating_add(micros(offset))
}

impl SqliteStore {
    async fn bump_source(
        &self,
        connection: &mut SqliteConnection,
        key: &str,
        source: Checkpoint,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.timer_sql().bump_source)
            .bind(key)
            .bind(to_i64(source.transaction_id))
            .bind(to_i64(source.position))
            .execute(&mut *connection)
            .await
            .map_err(db("recording a timer's latest cause"))?;
        Ok(())
    }

    fn timer_sql(&self) -> &TimerQueries {
        &self.inner.queries.timers
    }

    fn timers_table(&self) -> String {
        self.inner.tables.companion("timers")
    }
}

fn timer_row(row: &SqliteRow) -> Result<TimerRecord, StoreError> {
    let table = "timers";
    let get = || db("decoding a timer");
    let key: String = row.try_get("key").map_err(get())?;
    let state: &str = row.try_get("state").map_err(get())?;
    let payload: &str = row.try_get("payload").map_err(get())?;
    let metadata: &str = row.try_get("metadata").map_err(get())?;
    let source = source_columns(
        row.try_get("source_tx").map_err(get())?,
        row.try_get("source_pos").map_err(get())?,
    );
    let finished_at: Option<i64> = row.try_get("finished_at").map_err(get())?;
    let retry_at: Option<i64> = row.try_get("retry_at").map_err(get())?;
    Ok(TimerRecord {
        payload: serde_json::from_str(payload).map_err(|e| StoreError::Corrupt {
            table: table.to_owned(),
            what: format!("the payload of timer `{key}` is not JSON: {e}"),
        })?,
        metadata: decode_metadata(metadata, &key)?,
        state: timer_state(state, &key)?,
        target: row.try_get("target").map_err(get())?,
        target_id: row.try_get("target_id").map_err(get())?,
        due_at: micros_column(row.try_get("due_at").map_err(get())?, table)?,
        command_id: row.try_get("command_id").map_err(get())?,
        correlation_id: row.try_get("correlation_id").map_err(get())?,
        causation_id: row.try_get("causation_id").map_err(get())?,
        source,
        attempts: row.try_get::<i64, _>("attempts").map_err(get())?.max(0) as u32,
        last_error: row.try_get("last_error").map_err(get())?,
        scheduled_at: micros_column(row.try_get("scheduled_at").map_err(get())?, table)?,
        finished_at: finished_at
            .map(|micros| micros_column(micros, table))
            .transpose()?,
        retry_at: retry_at
            .map(|micros| micros_column(micros, table))
            .transpose()?,
        key,
    })
}

#[async_trait]
impl TimerStore for SqliteStore {
    type Database = Sqlite;

    async fn open_timers(&self) -> Result<String, StoreError> {
        let table = self.timers_table();
        let exists: bool = sqlx::query_scalar(&self.timer_sql().exists)
            .bind(&table)
            .fetch_one(self.pool())
            .await
            .map_err(db("looking for the timers table"))?;
        if !exists {
            return Err(ConfigError::MissingTable {
                table,
                hint: "apply the store's migrations (SqliteStoreBuilder::migrate)",
            }
            .into());
        }
        Ok(table)
    }

    async fn begin_timers(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        begin_immediate(self.writer())
            .await
            .map_err(db("starting a timers transaction"))
    }

    async fn schedule_timer(
        &self,
        connection: &mut SqliteConnection,
        timer: &NewTimer,
        replace: bool,
        offset: Duration,
    ) -> Result<Scheduled, StoreError> {
        let now = now_micros(offset);
        let due = match timer.due {
            Due::At(at) => at.timestamp_micros(),
            Due::After(after) => now.saturating_add(micros(after)),
        };
        let previous: Option<String> = sqlx::query_scalar(&self.timer_sql().previous_state)
            .bind(&timer.key)
            .fetch_optional(&mut *connection)
            .await
            .map_err(db("scheduling a timer"))?;
        let replaces_pending = previous.as_deref() == Some(TimerState::Pending.as_str());
        let written = sqlx::query(&self.timer_sql().schedule)
            .bind(&timer.key)
            .bind(&timer.target)
            .bind(&timer.target_id)
            .bind(timer.payload.to_string())
            .bind(due)
            .bind(timer.command_id)
            .bind(timer.correlation_id)
            .bind(timer.causation_id)
            .bind(encode_metadata(&timer.metadata)?)
            .bind(timer.source.map(|c| to_i64(c.transaction_id)))
            .bind(timer.source.map(|c| to_i64(c.position)))
            .bind(replace)
            .bind(Utc::now().timestamp_micros())
            .fetch_optional(&mut *connection)
            .await
            .map_err(db("scheduling a timer"))?
            .is_some();
        if !written {
            if let Some(source) = timer.source {
                self.bump_source(connection, &timer.key, source).await?;
            }
        }
        Ok(match (written, replaces_pending) {
            (false, _) => Scheduled::Unchanged,
            (true, false) => Scheduled::New,
            (true, true) => Scheduled::Replaced,
        })
    }

    async fn cancel_timer(
        &self,
        connection: &mut SqliteConnection,
        key: &str,
        source: Option<Checkpoint>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.timer_sql().cancel)
            .bind(key)
            .bind(source.map(|c| to_i64(c.transaction_id)))
            .bind(source.map(|c| to_i64(c.position)))
            .bind(Utc::now().timestamp_micros())
            .execute(&mut *connection)
            .await
            .map_err(db("cancelling a timer"))?;
        if let Some(source) = source {
            self.bump_source(connection, key, source).await?;
        }
        Ok(done.rows_affected() > 0)
    }

    async fn due_timers(
        &self,
        offset: Duration,
        horizon: Duration,
        limit: usize,
    ) -> Result<DueWindow, StoreError> {
        let now = now_micros(offset);
        let rows = sqlx::query(&self.timer_sql().due)
            .bind(now.saturating_add(micros(horizon)))
            .bind(to_i64(limit as u64))
            .fetch_all(self.pool())
            .await
            .map_err(db("reading due timers"))?;
        Ok(DueWindow {
            now: micros_column(now, "timers")?,
            timers: rows.iter().map(timer_row).collect::<Result<_, _>>()?,
        })
    }

    async fn still_pending(&self, keys: &[String]) -> Result<Vec<(String, Uuid)>, StoreError> {
        let keys = serde_json::to_string(keys).map_err(|source| StoreError::Serialize {
            what: "timer keys",
            aggregate_type: "timers".to_owned(),
            aggregate_id: String::new(),
            source,
        })?;
        sqlx::query_as(&self.timer_sql().still_pending)
            .bind(keys)
            .fetch_all(self.pool())
            .await
            .map_err(db("checking due timers"))
    }

    async fn finish_timers(&self, finished: &[(String, Uuid, Finish)]) -> Result<(), StoreError> {
        if finished.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_timers().await?;
        for (key, id, finish) in finished {
            self.finish_timer(Some(&mut tx), key, *id, finish).await?;
        }
        tx.commit().await.map_err(db("recording fired timers"))?;
        Ok(())
    }

    async fn finish_timer(
        &self,
        connection: Option<&mut SqliteConnection>,
        key: &str,
        command_id: Uuid,
        finish: &Finish,
    ) -> Result<bool, StoreError> {
        let (state, note) = finish_columns(finish);
        let query = sqlx::query(&self.timer_sql().finish)
            .bind(key)
            .bind(command_id)
            .bind(state.as_str())
            .bind(note)
            .bind(Utc::now().timestamp_micros());
        let done = match connection {
            Some(connection) => query.execute(&mut *connection).await,
            None => query.execute(self.writer()).await,
        }
        .map_err(db("recording a fired timer"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn note_timer_attempt(
        &self,
        key: &str,
        command_id: Uuid,
        error: &str,
        retry_in: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.timer_sql().attempt)
            .bind(key)
            .bind(command_id)
            .bind(error)
            .bind(now_micros(retry_in))
            .execute(self.writer())
            .await
            .map_err(db("recording a timer's failed attempt"))?;
        Ok(())
    }

    async fn timer(&self, key: &str) -> Result<Option<TimerRecord>, StoreError> {
        let row = sqlx::query(&self.timer_sql().get)
            .bind(key)
            .fetch_optional(self.pool())
            .await
            .map_err(db("reading a timer"))?;
        row.as_ref().map(timer_row).transpose()
    }

    async fn list_timers(&self, query: &TimerQuery) -> Result<Vec<TimerRecord>, StoreError> {
        let rows = sqlx::query(&self.timer_sql().list)
            .bind(query.state.map(TimerState::as_str))
            .bind(query.key_prefix.as_deref())
            .bind(to_i64(query.limit as u64))
            .fetch_all(self.pool())
            .await
            .map_err(db("listing timers"))?;
        rows.iter().map(timer_row).collect()
    }

    async fn timer_counts(
        &self,
        offset: Duration,
        late_after: Duration,
    ) -> Result<TimerCounts, StoreError> {
        let now = now_micros(offset);
        let row = sqlx::query(&self.timer_sql().counts)
            .bind(now)
            .bind(now.saturating_sub(micros(late_after)))
            .fetch_one(self.pool())
            .await
            .map_err(db("counting timers"))?;
        let count = |column: &'static str| -> Result<u64, StoreError> {
            Ok(row
                .try_get::<i64, _>(column)
                .map_err(db("counting timers"))?
                .max(0) as u64)
        };
        let now: DateTime<Utc> = micros_column(now, "timers")?;
        let next_due = row
            .try_get::<Option<i64>, _>("next_due")
            .map_err(db("counting timers"))?
            .map(|micros| micros_column(micros, "timers"))
            .transpose()?;
        counts_from(now, next_due, count)
    }

    async fn retry_timer(&self, key: &str, offset: Duration) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.timer_sql().retry)
            .bind(key)
            .bind(now_micros(offset))
            .bind(Uuid::now_v7())
            .execute(self.writer())
            .await
            .map_err(db("retrying a timer"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn prune_timers(&self, retention: Duration, limit: u64) -> Result<u64, StoreError> {
        let done = sqlx::query(&self.timer_sql().prune)
            .bind(now_micros(Duration::ZERO).saturating_sub(micros(retention)))
            .bind(to_i64(limit))
            .execute(self.writer())
            .await
            .map_err(db("deleting finished timers"))?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_timer_statement_is_rendered() {
        let tables = super::super::schema::Tables::new("events").expect("tables");
        let queries = super::super::queries::Queries::new(&tables);
        let queries = &queries.timers;
        crate::store::sql::statements::assert_rendered(queries.statements(), &[]);
        assert!(queries.due.contains("\"events_timers\""));
    }
}
