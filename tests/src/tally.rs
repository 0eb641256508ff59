//! `Tally`: a projection on a SQLite store that keeps one row per event it
//! handled (table `tally`, keyed by event id, so an event handled twice is
//! an error, not a silent double), refuses a deposit of 666 while `broken`
//! holds (a poison event to park, then retry once fixed), and empties its
//! table on a rebuild. Used where operators' tools act on a running node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use outflow::projection::{HandlerError, Projection};
use outflow::{RecordedEvent, SqliteStore, Transactional};
use serde_json::json;

type Tx = <SqliteStore as Transactional>::Transaction;

/// Counts events in the table `tally`; refuses 666 while `broken`.
pub struct Tally {
    /// While true, a deposit of 666 fails as the event's fault.
    pub broken: Arc<AtomicBool>,
}

#[async_trait]
impl Projection<SqliteStore> for Tally {
    fn name(&self) -> &str {
        "tally"
    }

    async fn setup(&self, tx: &mut Tx) -> Result<(), HandlerError> {
        outflow::sqlx::query("CREATE TABLE IF NOT EXISTS tally (event_id TEXT PRIMARY KEY)")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Tx) -> Result<(), HandlerError> {
        outflow::sqlx::query("DELETE FROM tally")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn handle(&self, events: &[RecordedEvent], tx: &mut Tx) -> Result<(), HandlerError> {
        for event in events {
            if event.payload["Deposited"]["amount"] == json!(666)
                && self.broken.load(Ordering::SeqCst)
            {
                return Err(HandlerError::data("666 is refused"));
            }
            outflow::sqlx::query("INSERT INTO tally (event_id) VALUES (?1)")
                .bind(event.event_id.to_string())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

/// Rows in the table `tally`.
pub async fn tallied(store: &SqliteStore) -> i64 {
    outflow::sqlx::query_scalar("SELECT COUNT(*) FROM tally")
        .fetch_one(store.readers())
        .await
        .expect("count the tally")
}
