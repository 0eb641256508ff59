//! Timers on PostgreSQL, in `<events table>_timers`: the due time decided by
//! the server's clock, the window a range scan of a partial index on the due
//! time of pending timers.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{begin_owned, db, to_i64, PostgresStore};
use crate::error::{ConfigError, StoreError};
use crate::event::Checkpoint;
use crate::port::timers::{
    Due, DueWindow, Finish, NewTimer, Scheduled, TimerCounts, TimerQuery, TimerRecord, TimerState,
    TimerStore,
};
use crate::store::sql::timers::{
    counts_from, decode_metadata, finish_columns, micros, source_columns, timer_state,
};

crate::store::sql::statements::sql_statements! {
    /// The timers' statements, one `.sql` file each under `queries/timers/`.
    pub(super) struct TimerQueries in "queries/timers/" {
        schedule,
        cancel,
        due,
        finish,
        finish_many,
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

impl PostgresStore {
    async fn bump_source(
        &self,
        connection: &mut PgConnection,
        key: &str,
        source: Checkpoint,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.inner.timer_sql.bump_source)
            .bind(key)
            .bind(to_i64(source.transaction_id))
            .bind(to_i64(source.position))
            .execute(&mut *connection)
            .await
            .map_err(db("recording a timer's latest cause"))?;
        Ok(())
    }

    fn timers_table(&self) -> Result<String, StoreError> {
        Ok(
            crate::names::Identifier::parse(self.events_table(), "events table")?
                .derived("timers", "timers table")?
                .to_string(),
        )
    }

    fn timer_row(&self, row: &PgRow) -> Result<TimerRecord, StoreError> {
        let table = "timers";
        let decode = db("decoding a timer");
        let state: String = row.try_get("state").map_err(db("decoding a timer"))?;
        let source = source_columns(
            row.try_get("source_tx").map_err(db("decoding a timer"))?,
            row.try_get("source_pos").map_err(db("decoding a timer"))?,
        );
        let payload: String = row.try_get("payload").map_err(db("decoding a timer"))?;
        let metadata: String = row.try_get("metadata").map_err(db("decoding a timer"))?;
        let key: String = row.try_get("key").map_err(decode)?;
        Ok(TimerRecord {
            payload: serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt {
                table: table.to_owned(),
                what: format!("the payload of timer `{key}` is not JSON: {e}"),
            })?,
            metadata: decode_metadata(&metadata, &key)?,
            target: row.try_get("target").map_err(db("decoding a timer"))?,
            target_id: row.try_get("target_id").map_err(db("decoding a timer"))?,
            due_at: row.try_get("due_at").map_err(db("decoding a timer"))?,
            command_id: row.try_get("command_id").map_err(db("decoding a timer"))?,
            correlation_id: row
                .try_get("correlation_id")
                .map_err(db("decoding a timer"))?,
            causation_id: row
                .try_get("causation_id")
                .map_err(db("decoding a timer"))?,
            source,
            state: timer_state(&state, &key)?,
            attempts: row
                .try_get::<i32, _>("attempts")
                .map_err(db("decoding a timer"))?
                .max(0) as u32,
            last_error: row.try_get("last_error").map_err(db("decoding a timer"))?,
            scheduled_at: row
                .try_get("scheduled_at")
                .map_err(db("decoding a timer"))?,
            finished_at: row.try_get("finished_at").map_err(db("decoding a timer"))?,
            retry_at: row.try_get("retry_at").map_err(db("decoding a timer"))?,
            key,
        })
    }
}

#[async_trait]
impl TimerStore for PostgresStore {
    type Database = Postgres;

    async fn open_timers(&self) -> Result<String, StoreError> {
        let table = self.timers_table()?;
        let exists: bool = sqlx::query_scalar(&self.inner.timer_sql.exists)
            .bind(crate::names::Identifier::parse(&table, "timers table")?.quoted())
            .fetch_one(self.pool())
            .await
            .map_err(db("looking for the timers table"))?;
        if !exists {
            return Err(ConfigError::MissingTable {
                table,
                hint: "apply the store's migrations (PostgresStoreBuilder::migrate or \
                       PostgresStore::migrate)",
            }
            .into());
        }
        Ok(table)
    }

    async fn begin_timers(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        begin_owned(self.pool())
            .await
            .map_err(db("starting a timers transaction"))
    }

    async fn schedule_timer(
        &self,
        connection: &mut PgConnection,
        timer: &NewTimer,
        replace: bool,
        offset: Duration,
    ) -> Result<Scheduled, StoreError> {
        let (at, after): (Option<DateTime<Utc>>, Option<i64>) = match timer.due {
            Due::At(at) => (Some(at), None),
            Due::After(after) => (None, Some(micros(after))),
        };
        let metadata = crate::store::sql::timers::encode_metadata(&timer.metadata)?;
        let row = sqlx::query(&self.inner.timer_sql.schedule)
            .bind(&timer.key)
            .bind(&timer.target)
            .bind(&timer.target_id)
            .bind(timer.payload.to_string())
            .bind(at)
            .bind(after)
            .bind(timer.command_id)
            .bind(timer.correlation_id)
            .bind(timer.causation_id)
            .bind(metadata)
            .bind(timer.source.map(|c| to_i64(c.transaction_id)))
            .bind(timer.source.map(|c| to_i64(c.position)))
            .bind(replace)
            .bind(micros(offset))
            .fetch_optional(&mut *connection)
            .await
            .map_err(db("scheduling a timer"))?;
        Ok(match row {
            None => {
                if let Some(source) = timer.source {
                    self.bump_source(connection, &timer.key, source).await?;
                }
                Scheduled::Unchanged
            }
            Some(row) => {
                if row
                    .try_get::<bool, _>("new")
                    .map_err(db("scheduling a timer"))?
                {
                    Scheduled::New
                } else {
                    Scheduled::Replaced
                }
            }
        })
    }

    async fn cancel_timer(
        &self,
        connection: &mut PgConnection,
        key: &str,
        source: Option<Checkpoint>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.inner.timer_sql.cancel)
            .bind(key)
            .bind(source.map(|c| to_i64(c.transaction_id)))
            .bind(source.map(|c| to_i64(c.position)))
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
        let rows = sqlx::query(&self.inner.timer_sql.due)
            .bind(micros(offset))
            .bind(micros(horizon))
            .bind(to_i64(limit as u64))
            .fetch_all(self.pool())
            .await
            .map_err(db("reading due timers"))?;
        let mut now = Utc::now();
        let mut timers = Vec::with_capacity(rows.len());
        for row in &rows {
            now = row.try_get("clock_now").map_err(db("reading due timers"))?;
            if row
                .try_get::<Option<String>, _>("key")
                .map_err(db("reading due timers"))?
                .is_some()
            {
                timers.push(self.timer_row(row)?);
            }
        }
        Ok(DueWindow { now, timers })
    }

    async fn still_pending(&self, keys: &[String]) -> Result<Vec<(String, Uuid)>, StoreError> {
        sqlx::query_as(&self.inner.timer_sql.still_pending)
            .bind(keys)
            .fetch_all(self.pool())
            .await
            .map_err(db("checking due timers"))
    }

    async fn finish_timers(&self, finished: &[(String, Uuid, Finish)]) -> Result<(), StoreError> {
        if finished.is_empty() {
            return Ok(());
        }
        // In key order: concurrent writers of the same keys lock them in
        // one order.
        let mut finished: Vec<&(String, Uuid, Finish)> = finished.iter().collect();
        finished.sort_by(|a, b| a.0.cmp(&b.0));
        let mut keys = Vec::with_capacity(finished.len());
        let mut ids = Vec::with_capacity(finished.len());
        let mut states = Vec::with_capacity(finished.len());
        let mut notes = Vec::with_capacity(finished.len());
        for (key, id, finish) in finished {
            let (state, note) = finish_columns(finish);
            keys.push(key.as_str());
            ids.push(*id);
            states.push(state.as_str());
            notes.push(note);
        }
        sqlx::query(&self.inner.timer_sql.finish_many)
            .bind(keys)
            .bind(ids)
            .bind(states)
            .bind(notes)
            .execute(self.pool())
            .await
            .map_err(db("recording fired timers"))?;
        Ok(())
    }

    async fn finish_timer(
        &self,
        connection: Option<&mut PgConnection>,
        key: &str,
        command_id: Uuid,
        finish: &Finish,
    ) -> Result<bool, StoreError> {
        let (state, note) = finish_columns(finish);
        let query = sqlx::query(&self.inner.timer_sql.finish)
            .bind(key)
            .bind(command_id)
            .bind(state.as_str())
            .bind(note);
        let done = match connection {
            Some(connection) => query.execute(&mut *connection).await,
            None => query.execute(self.pool()).await,
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
        sqlx::query(&self.inner.timer_sql.attempt)
            .bind(key)
            .bind(command_id)
            .bind(error)
            .bind(micros(retry_in))
            .execute(self.pool())
            .await
            .map_err(db("recording a timer's failed attempt"))?;
        Ok(())
    }

    async fn timer(&self, key: &str) -> Result<Option<TimerRecord>, StoreError> {
        let row = sqlx::query(&self.inner.timer_sql.get)
            .bind(key)
            .fetch_optional(self.pool())
            .await
            .map_err(db("reading a timer"))?;
        row.map(|row| self.timer_row(&row)).transpose()
    }

    async fn list_timers(&self, query: &TimerQuery) -> Result<Vec<TimerRecord>, StoreError> {
        let rows = sqlx::query(&self.inner.timer_sql.list)
            .bind(query.state.map(TimerState::as_str))
            .bind(query.key_prefix.as_deref())
            .bind(to_i64(query.limit as u64))
            .fetch_all(self.pool())
            .await
            .map_err(db("listing timers"))?;
        rows.iter().map(|row| self.timer_row(row)).collect()
    }

    async fn timer_counts(
        &self,
        offset: Duration,
        late_after: Duration,
    ) -> Result<TimerCounts, StoreError> {
        let row = sqlx::query(&self.inner.timer_sql.counts)
            .bind(micros(offset))
            .bind(micros(late_after))
            .fetch_one(self.pool())
            .await
            .map_err(db("counting timers"))?;
        let count = |column: &'static str| -> Result<u64, StoreError> {
            Ok(row
                .try_get::<i64, _>(column)
                .map_err(db("counting timers"))?
                .max(0) as u64)
        };
        let now: DateTime<Utc> = row.try_get("clock_now").map_err(db("counting timers"))?;
        let next_due: Option<DateTime<Utc>> =
            row.try_get("next_due").map_err(db("counting timers"))?;
        counts_from(now, next_due, count)
    }

    async fn retry_timer(&self, key: &str, offset: Duration) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.inner.timer_sql.retry)
            .bind(key)
            .bind(micros(offset))
            .bind(Uuid::now_v7())
            .execute(self.pool())
            .await
            .map_err(db("retrying a timer"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn prune_timers(&self, retention: Duration, limit: u64) -> Result<u64, StoreError> {
        let done = sqlx::query(&self.inner.timer_sql.prune)
            .bind(micros(retention))
            .bind(to_i64(limit))
            .execute(self.pool())
            .await
            .map_err(db("deleting finished timers"))?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_timer_statement_is_rendered() {
        let names = super::super::schema::Names::new("events", None).expect("names");
        let queries = TimerQueries::new(|sql| names.render(sql));
        crate::store::sql::statements::assert_rendered(queries.statements(), &[]);
        assert!(queries.due.contains("\"events_timers\""));
    }
}
