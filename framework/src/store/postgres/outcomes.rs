//! Remembered command outcomes (see [`crate::outcome`]) in `<events>_outcomes`.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::{pg_error, to_i64, u64_column, PostgresStore};
use crate::error::StoreError;
use crate::outcome::CommandOutcome;

impl PostgresStore {
    pub(super) async fn outcome_of(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<CommandOutcome>, StoreError> {
        let row = sqlx::query(&self.inner.sql.outcome)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(command_id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading a command's outcome", e))?;
        row.map(|row| self.outcome_row(&row, aggregate_type, aggregate_id, command_id))
            .transpose()
    }

    pub(super) async fn store_outcome(
        &self,
        outcome: CommandOutcome,
    ) -> Result<CommandOutcome, StoreError> {
        let (message, json) = outcome.refusal_columns();
        let row = sqlx::query(&self.inner.sql.record_outcome)
            .bind(&outcome.aggregate_type)
            .bind(&outcome.aggregate_id)
            .bind(outcome.command_id)
            .bind(to_i64(outcome.version))
            .bind(message)
            .bind(json)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| pg_error("storing a command's outcome", e))?;
        match row {
            Some(row) => self.outcome_row(
                &row,
                &outcome.aggregate_type,
                &outcome.aggregate_id,
                outcome.command_id,
            ),
            // The row another sender committed while this statement waited
            // on it is visible to the next statement.
            None => self
                .outcome_of(
                    &outcome.aggregate_type,
                    &outcome.aggregate_id,
                    outcome.command_id,
                )
                .await?
                .ok_or_else(|| StoreError::Corrupt {
                    table: self.outcomes_table(),
                    what: format!(
                        "the outcome of command {} vanished while it was stored",
                        outcome.command_id
                    ),
                }),
        }
    }

    pub(super) async fn claim_on(
        &self,
        connection: &mut sqlx::PgConnection,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
        version: u64,
    ) -> Result<(), StoreError> {
        let claimed = sqlx::query(&self.inner.sql.claim_command)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(command_id)
            .bind(to_i64(version))
            .fetch_optional(&mut *connection)
            .await
            .map_err(|e| pg_error("claiming a command id", e))?;
        match claimed {
            Some(_) => Ok(()),
            None => Err(StoreError::Conflict {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                expected: version.saturating_sub(1),
                actual: None,
            }),
        }
    }

    pub(super) async fn prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query(&self.inner.sql.prune_outcomes)
            .bind(before)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| pg_error("pruning command outcomes", e))?;
        Ok(done.rows_affected())
    }

    fn outcomes_table(&self) -> String {
        format!("{}_outcomes", self.inner.events_table)
    }

    fn outcome_row(
        &self,
        row: &PgRow,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<CommandOutcome, StoreError> {
        let table = self.outcomes_table();
        let get = |e| pg_error("reading a command's outcome", e);
        CommandOutcome::from_columns(
            aggregate_type,
            aggregate_id,
            command_id,
            u64_column(row, "version", &table)?,
            row.try_get("recorded_at").map_err(get)?,
            row.try_get("refusal").map_err(get)?,
            row.try_get("refusal_json").map_err(get)?,
        )
        .map_err(|what| StoreError::Corrupt { table, what })
    }
}
