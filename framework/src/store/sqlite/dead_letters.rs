//! Dead letters and the inbox on SQLite: events a projection parked, with
//! their errors and attempts, the retries operators ask for, and the
//! messages a handler has handled, each written in the caller's write
//! transaction or one of its own.

use async_trait::async_trait;
use chrono::Utc;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::projection_store::{u32_column, unit_from_row};
use super::rows::{time_column, time_text, u64_column};
use super::{db, to_i64, SqliteStore};
use crate::error::{EventRef, StoreError};
use crate::event::Checkpoint;
use crate::port::projections::{DeadLetter, DeadLetters, Inbox, NewDeadLetter, UnitId};

/// A dead letter's id as SQLite stores it; `None` for ids SQLite cannot
/// have given, so that they match no row.
fn dead_letter_key(id: u64) -> Option<i64> {
    i64::try_from(id).ok()
}

/// A dead letter from a row with the dead-letter columns (see `queries.rs`).
fn dead_letter_from_row(row: &SqliteRow, table: &str) -> Result<DeadLetter, StoreError> {
    const OPERATION: &str = "reading a dead letter";
    let get = || db(OPERATION);
    let position = u64_column(row, "position", table)?;
    let first_failed_at: String = row.try_get("first_failed_at").map_err(get())?;
    let last_failed_at: String = row.try_get("last_failed_at").map_err(get())?;
    Ok(DeadLetter {
        id: u64_column(row, "id", table)?,
        unit: unit_from_row(row, table, OPERATION)?,
        event_id: row.try_get("event_id").map_err(get())?,
        checkpoint: Checkpoint::new(u64_column(row, "transaction_id", table)?, position),
        event: EventRef {
            aggregate_type: row.try_get("aggregate_type").map_err(get())?,
            aggregate_id: row.try_get("aggregate_id").map_err(get())?,
            sequence: u64_column(row, "sequence", table)?,
            position: Some(position),
            event_type: row.try_get("event_type").map_err(get())?,
            event_version: row.try_get("event_version").map_err(get())?,
        },
        error: row.try_get("error").map_err(get())?,
        attempts: u32_column(row, "attempts", table, OPERATION)?,
        first_failed_at: time_column(&first_failed_at, table)?,
        last_failed_at: time_column(&last_failed_at, table)?,
    })
}

#[async_trait]
impl DeadLetters for SqliteStore {
    async fn park(
        &self,
        tx: &mut Self::Transaction,
        dead_letter: NewDeadLetter<'_>,
    ) -> Result<(), StoreError> {
        let event = dead_letter.event;
        sqlx::query(&self.inner.queries.park)
            .bind(&dead_letter.unit.projection)
            .bind(i64::from(dead_letter.unit.partition))
            .bind(event.event_id)
            .bind(to_i64(event.transaction_id))
            .bind(to_i64(event.position))
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(to_i64(event.sequence))
            .bind(&event.event_type)
            .bind(&event.event_version)
            .bind(&dead_letter.error)
            .bind(i64::from(dead_letter.attempts))
            .bind(time_text(dead_letter.first_failed_at))
            .bind(time_text(Utc::now()))
            .execute(&mut **tx)
            .await
            .map_err(db("parking an event"))?;
        Ok(())
    }

    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(&self.inner.queries.dead_letters)
            .bind(projection)
            .fetch_all(&self.inner.readers)
            .await
            .map_err(db("listing dead letters"))?;
        let table = self.dead_letters_table();
        rows.iter()
            .map(|row| dead_letter_from_row(row, &table))
            .collect()
    }

    async fn take_dead_letter(
        &self,
        tx: &mut Self::Transaction,
        id: u64,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let Some(key) = dead_letter_key(id) else {
            return Ok(None);
        };
        let row = sqlx::query(&self.inner.queries.take_dead_letter)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db("taking a dead letter"))?;
        row.map(|row| dead_letter_from_row(&row, &self.dead_letters_table()))
            .transpose()
    }

    async fn note_dead_letter_failure(&self, id: u64, error: &str) -> Result<(), StoreError> {
        let Some(key) = dead_letter_key(id) else {
            return Ok(());
        };
        sqlx::query(&self.inner.queries.note_dead_letter_failure)
            .bind(key)
            .bind(error)
            .bind(time_text(Utc::now()))
            .execute(&self.inner.writer)
            .await
            .map_err(db("recording a failed retry"))?;
        Ok(())
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        let Some(key) = dead_letter_key(id) else {
            return Ok(false);
        };
        let deleted = sqlx::query(&self.inner.queries.discard_dead_letter)
            .bind(key)
            .execute(&self.inner.writer)
            .await
            .map_err(db("discarding a dead letter"))?
            .rows_affected();
        Ok(deleted == 1)
    }

    async fn request_retry(&self, id: u64) -> Result<bool, StoreError> {
        let Some(key) = dead_letter_key(id) else {
            return Ok(false);
        };
        let updated = sqlx::query(&self.inner.queries.request_retry)
            .bind(key)
            .bind(time_text(Utc::now()))
            .execute(&self.inner.writer)
            .await
            .map_err(db("asking for a dead letter's retry"))?
            .rows_affected();
        Ok(updated == 1)
    }

    async fn retry_requests(&self) -> Result<Vec<(UnitId, u64)>, StoreError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(&self.inner.queries.retry_requests)
            .fetch_all(&self.inner.readers)
            .await
            .map_err(db("reading the retries asked for"))?;
        crate::store::sql::rows::retry_requests(rows, &self.dead_letters_table())
    }
}

#[async_trait]
impl Inbox for SqliteStore {
    async fn inbox_claim(
        &self,
        tx: &mut Self::Transaction,
        handler: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(&self.inner.queries.inbox_claim)
            .bind(handler)
            .bind(message_id)
            .bind(time_text(Utc::now()))
            .execute(&mut **tx)
            .await
            .map_err(db("recording a message in the inbox"))?
            .rows_affected();
        Ok(inserted == 1)
    }
}
