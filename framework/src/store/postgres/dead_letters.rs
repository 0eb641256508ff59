//! Dead letters and the inbox on PostgreSQL: events a projection parked,
//! with their errors and attempts, the retries operators ask for, and the
//! messages a handler has handled, each written in the caller's transaction
//! or on its own.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::projection_store::partition_of;
use super::{db, to_i64, txid_column, u64_column, PostgresStore};
use crate::error::{EventRef, StoreError};
use crate::event::Checkpoint;
use crate::port::projections::{DeadLetter, DeadLetters, Inbox, NewDeadLetter, UnitId};

fn dead_letter_from_row(row: &PgRow, table: &str) -> Result<DeadLetter, StoreError> {
    let get = db("reading a dead letter");
    let attempts: i32 = row.try_get("attempts").map_err(get)?;
    Ok(DeadLetter {
        id: u64_column(row, "id", table)?,
        unit: UnitId {
            projection: row
                .try_get("projection")
                .map_err(db("reading a dead letter"))?,
            partition: partition_of(row)?,
        },
        event_id: row
            .try_get("event_id")
            .map_err(db("reading a dead letter"))?,
        checkpoint: Checkpoint::new(
            txid_column(row, table)?,
            u64_column(row, "position", table)?,
        ),
        event: EventRef {
            aggregate_type: row
                .try_get("aggregate_type")
                .map_err(db("reading a dead letter"))?,
            aggregate_id: row
                .try_get("aggregate_id")
                .map_err(db("reading a dead letter"))?,
            sequence: u64_column(row, "sequence", table)?,
            position: Some(u64_column(row, "position", table)?),
            event_type: row
                .try_get("event_type")
                .map_err(db("reading a dead letter"))?,
            event_version: row
                .try_get("event_version")
                .map_err(db("reading a dead letter"))?,
        },
        error: row.try_get("error").map_err(db("reading a dead letter"))?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        first_failed_at: row
            .try_get("first_failed_at")
            .map_err(db("reading a dead letter"))?,
        last_failed_at: row
            .try_get("last_failed_at")
            .map_err(db("reading a dead letter"))?,
    })
}

#[async_trait]
impl DeadLetters for PostgresStore {
    async fn park(
        &self,
        tx: &mut Self::Transaction,
        dead_letter: NewDeadLetter<'_>,
    ) -> Result<(), StoreError> {
        let event = dead_letter.event;
        sqlx::query(&self.inner.projection_sql.park)
            .bind(&dead_letter.unit.projection)
            .bind(dead_letter.unit.partition as i32)
            .bind(event.event_id)
            .bind(event.transaction_id.to_string())
            .bind(to_i64(event.position))
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(to_i64(event.sequence))
            .bind(&event.event_type)
            .bind(&event.event_version)
            .bind(&dead_letter.error)
            .bind(i32::try_from(dead_letter.attempts).unwrap_or(i32::MAX))
            .bind(dead_letter.first_failed_at)
            .execute(&mut **tx)
            .await
            .map_err(db("parking an event"))?;
        Ok(())
    }

    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(&self.inner.projection_sql.dead_letters)
            .bind(projection)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db("listing dead letters"))?;
        rows.iter()
            .map(|row| dead_letter_from_row(row, self.table()))
            .collect()
    }

    async fn take_dead_letter(
        &self,
        tx: &mut Self::Transaction,
        id: u64,
    ) -> Result<Option<DeadLetter>, StoreError> {
        let Some(row) = sqlx::query(&self.inner.projection_sql.take_dead_letter)
            .bind(to_i64(id))
            .fetch_optional(&mut **tx)
            .await
            .map_err(db("taking a dead letter"))?
        else {
            return Ok(None);
        };
        dead_letter_from_row(&row, self.table()).map(Some)
    }

    async fn note_dead_letter_failure(&self, id: u64, error: &str) -> Result<(), StoreError> {
        sqlx::query(&self.inner.projection_sql.note_dead_letter_failure)
            .bind(to_i64(id))
            .bind(error)
            .execute(&self.inner.pool)
            .await
            .map_err(db("recording a failed retry"))?;
        Ok(())
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        let deleted = sqlx::query(&self.inner.projection_sql.discard_dead_letter)
            .bind(to_i64(id))
            .execute(&self.inner.pool)
            .await
            .map_err(db("discarding a dead letter"))?
            .rows_affected();
        Ok(deleted == 1)
    }

    async fn request_retry(&self, id: u64) -> Result<bool, StoreError> {
        let updated = sqlx::query(&self.inner.projection_sql.request_retry)
            .bind(to_i64(id))
            .execute(&self.inner.pool)
            .await
            .map_err(db("asking for a dead letter's retry"))?
            .rows_affected();
        Ok(updated == 1)
    }

    async fn retry_requests(&self) -> Result<Vec<(UnitId, u64)>, StoreError> {
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as(&self.inner.projection_sql.retry_requests)
                .fetch_all(&self.inner.pool)
                .await
                .map_err(db("reading the retries asked for"))?;
        crate::store::sql::rows::retry_requests(rows, "dead letters")
    }
}

#[async_trait]
impl Inbox for PostgresStore {
    async fn inbox_claim(
        &self,
        tx: &mut Self::Transaction,
        handler: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(&self.inner.projection_sql.inbox_claim)
            .bind(handler)
            .bind(message_id)
            .execute(&mut **tx)
            .await
            .map_err(db("recording a message in the inbox"))?
            .rows_affected();
        Ok(inserted == 1)
    }
}
