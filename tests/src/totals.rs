//! A running sum per account, updated with `+=` in the batch's transaction:
//! a read model that shows a batch applied twice (or lost) when compared
//! with the fold of the log. Table `totals (account, sum, events)`.

use outflow::projection::{HandlerError, Projection};
use outflow::{LogFilter, PostgresStore, RecordedEvent};
use sqlx::{Postgres, Transaction};

/// The projection `totals` over `account` events; a deposit's amount is
/// added to its account's sum (other events add 0), and every event to its
/// count.
pub struct Totals;

#[outflow::async_trait]
impl Projection<PostgresStore> for Totals {
    fn name(&self) -> &str {
        "totals"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            let amount = event.payload["Deposited"]["amount"].as_i64().unwrap_or(0);
            sqlx::query(
                "INSERT INTO totals (account, sum, events) VALUES ($1, $2, 1) \
                 ON CONFLICT (account) DO UPDATE \
                 SET sum = totals.sum + excluded.sum, events = totals.events + 1",
            )
            .bind(&event.aggregate_id)
            .bind(amount)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS totals \
             (account text PRIMARY KEY, sum bigint NOT NULL, events bigint NOT NULL)",
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
