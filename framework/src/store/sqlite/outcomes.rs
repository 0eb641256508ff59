//! Remembered command outcomes (see [`crate::outcome`]) in `<events>_outcomes`.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use super::rows::{micros_column, u64_column};
use super::{db, to_i64, SqliteStore};
use crate::error::StoreError;
use crate::outcome::CommandOutcome;

impl SqliteStore {
    pub(super) async fn outcome_of(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<CommandOutcome>, StoreError> {
        let row = sqlx::query(&self.inner.queries.outcome)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(command_id)
            .fetch_optional(&self.inner.readers)
            .await
            .map_err(db("reading a command's outcome"))?;
        row.map(|row| self.outcome_row(&row, aggregate_type, aggregate_id, command_id))
            .transpose()
    }

    /// Stores `outcome` unless one is stored, and reads back the stored one,
    /// both under the write lock.
    pub(super) async fn store_outcome(
        &self,
        outcome: CommandOutcome,
    ) -> Result<CommandOutcome, StoreError> {
        let mut tx = self.begin_write("storing a command's outcome").await?;
        self.insert_outcome(&mut tx, &outcome).await?;
        let row = sqlx::query(&self.inner.queries.outcome)
            .bind(&outcome.aggregate_type)
            .bind(&outcome.aggregate_id)
            .bind(outcome.command_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("storing a command's outcome"))?;
        let stored = self.outcome_row(
            &row,
            &outcome.aggregate_type,
            &outcome.aggregate_id,
            outcome.command_id,
        )?;
        tx.commit()
            .await
            .map_err(db("storing a command's outcome"))?;
        Ok(stored)
    }

    /// Claims a command id inside the transaction that appends its events.
    pub(super) async fn claim_on(
        &self,
        connection: &mut SqliteConnection,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
        version: u64,
    ) -> Result<(), StoreError> {
        let claim = CommandOutcome {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            command_id,
            version,
            recorded_at: Utc::now(),
            refusal: None,
        };
        if self.insert_outcome(connection, &claim).await? {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                expected: version.saturating_sub(1),
                actual: None,
            })
        }
    }

    pub(super) async fn prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.begin_write("pruning command outcomes").await?;
        let done = sqlx::query(&self.inner.queries.outcome_prune)
            .bind(before.timestamp_micros())
            .execute(&mut *tx)
            .await
            .map_err(db("pruning command outcomes"))?;
        tx.commit().await.map_err(db("pruning command outcomes"))?;
        Ok(done.rows_affected())
    }

    /// `true` when the row was inserted (no outcome was stored).
    async fn insert_outcome(
        &self,
        connection: &mut SqliteConnection,
        outcome: &CommandOutcome,
    ) -> Result<bool, StoreError> {
        let (message, json) = outcome.refusal_columns();
        let done = sqlx::query(&self.inner.queries.outcome_insert)
            .bind(&outcome.aggregate_type)
            .bind(&outcome.aggregate_id)
            .bind(outcome.command_id)
            .bind(to_i64(outcome.version))
            .bind(message)
            .bind(json)
            .bind(outcome.recorded_at.timestamp_micros())
            .execute(&mut *connection)
            .await
            .map_err(db("storing a command's outcome"))?;
        Ok(done.rows_affected() == 1)
    }

    fn outcome_row(
        &self,
        row: &SqliteRow,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<CommandOutcome, StoreError> {
        let table = self.inner.tables.companion("outcomes");
        let get = || db("reading a command's outcome");
        let micros: i64 = row.try_get("recorded_at").map_err(get())?;
        CommandOutcome::from_columns(
            aggregate_type,
            aggregate_id,
            command_id,
            u64_column(row, "version", &table)?,
            micros_column(micros, &table)?,
            row.try_get("refusal").map_err(get())?,
            row.try_get("refusal_json").map_err(get())?,
        )
        .map_err(|what| StoreError::Corrupt { table, what })
    }
}
