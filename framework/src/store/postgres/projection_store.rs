//! [`ProjectionStore`] for PostgreSQL: projection state rows with leases and
//! epochs, dead letters and the inbox, all in the events table's schema.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use super::{
    bind_filter, db, decode_event, filter_sql, to_i64, txid_column, u64_column, Names,
    PostgresStore,
};
use crate::error::{EventRef, StoreError};
use crate::event::{Checkpoint, RecordedEvent};
use crate::log::{LogFilter, Wakeups};
use crate::store::projections::{
    DeadLetter, Lease, NewDeadLetter, OldestTransaction, ProjectionState, ProjectionStore, UnitId,
    UnitRecord,
};

/// The projection queries, read from `projections.sql` (sections headed
/// `-- name: ...`) and rendered with the store's table names.
#[derive(Debug)]
pub(super) struct Queries {
    by_name: HashMap<&'static str, String>,
    count_events: String,
    first_pending: String,
}

impl Queries {
    pub(super) fn new(names: &Names) -> Self {
        let mut by_name = HashMap::new();
        let text = include_str!("projections.sql");
        let mut sections = text.split("-- name: ").skip(1);
        for section in sections.by_ref() {
            let (name, body) = section.split_once('\n').unwrap_or((section, ""));
            by_name.insert(name.trim(), names.render(body.trim()));
        }
        Queries {
            by_name,
            count_events: names.render(
                "SELECT count(*) FROM (SELECT 1 FROM {events} e
                  WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2)
                    AND (e.transaction_id, e.position) <= ($3::text::xid8, $4)
                    {filter}
                  LIMIT $5) c",
            ),
            first_pending: names.render(
                "SELECT e.recorded_at FROM {events} e
                  WHERE (e.transaction_id, e.position) > ($1::text::xid8, $2)
                    AND e.transaction_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                    {filter}
                  ORDER BY e.transaction_id, e.position
                  LIMIT 1",
            ),
        }
    }

    fn get(&self, name: &str) -> &str {
        // Every name used below is a section of projections.sql; the unit test
        // `every_projection_query_exists` checks it.
        self.by_name.get(name).map_or("", String::as_str)
    }
}

fn lease_from_row(row: &PgRow, unit: UnitId, table: &str) -> Result<Lease, StoreError> {
    Ok(Lease {
        unit,
        epoch: u64_column(row, "epoch", table)?,
        checkpoint: Checkpoint::new(
            txid_column(row, table)?,
            u64_column(row, "position", table)?,
        ),
        paused: row.try_get("paused").map_err(db("reading a lease"))?,
    })
}

fn partition_of(row: &PgRow) -> Result<u32, StoreError> {
    let partition: i32 = row
        .try_get("partition")
        .map_err(db("reading a partition"))?;
    u32::try_from(partition).map_err(|_| StoreError::Corrupt {
        table: "projections".into(),
        what: format!("negative partition {partition}"),
    })
}

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

impl PostgresStore {
    fn q(&self, name: &str) -> &str {
        self.inner.projection_sql.get(name)
    }

    fn table(&self) -> &str {
        &self.inner.events_table
    }
}

#[async_trait]
impl ProjectionStore for PostgresStore {
    type Transaction = Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Transaction, StoreError> {
        self.inner
            .pool
            .begin()
            .await
            .map_err(db("starting a transaction"))
    }

    async fn commit(&self, tx: Self::Transaction) -> Result<(), StoreError> {
        tx.commit().await.map_err(db("committing a transaction"))
    }

    async fn register_projection(&self, name: &str, partitions: u32) -> Result<(), StoreError> {
        let stored: Vec<i32> = sqlx::query_scalar(self.q("partition_counts"))
            .bind(name)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db("reading a projection's partitions"))?;
        if let Some(other) = stored.iter().find(|&&n| n != partitions as i32) {
            return Err(StoreError::Config(format!(
                "projection `{name}` is stored with {other} partitions, registered with \
                 {partitions}: run it under a new name to change the partition count"
            )));
        }
        sqlx::query(self.q("register"))
            .bind(name)
            .bind(partitions as i32)
            .execute(&self.inner.pool)
            .await
            .map_err(db("registering a projection"))?;
        Ok(())
    }

    async fn node_heartbeat(&self, node: &str, ttl: Duration) -> Result<u32, StoreError> {
        let live: i64 = sqlx::query_scalar(self.q("node_heartbeat"))
            .bind(node)
            .bind(ttl.as_secs_f64())
            .fetch_one(&self.inner.pool)
            .await
            .map_err(db("recording a node heartbeat"))?;
        Ok(u32::try_from(live).unwrap_or(1).max(1))
    }

    async fn claim(
        &self,
        unit: &UnitId,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query(self.q("claim"))
            .bind(&unit.projection)
            .bind(unit.partition as i32)
            .bind(node)
            .bind(ttl.as_secs_f64())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(db("claiming a projection"))?;
        row.map(|row| lease_from_row(&row, unit.clone(), self.table()))
            .transpose()
    }

    async fn renew(&self, node: &str, ttl: Duration) -> Result<Vec<Lease>, StoreError> {
        let rows = sqlx::query(self.q("renew"))
            .bind(node)
            .bind(ttl.as_secs_f64())
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db("renewing leases"))?;
        rows.iter()
            .map(|row| {
                let unit = UnitId {
                    projection: row.try_get("projection").map_err(db("renewing leases"))?,
                    partition: partition_of(row)?,
                };
                lease_from_row(row, unit, self.table())
            })
            .collect()
    }

    async fn release(&self, lease: &Lease, node: &str) -> Result<(), StoreError> {
        sqlx::query(self.q("release"))
            .bind(&lease.unit.projection)
            .bind(lease.unit.partition as i32)
            .bind(to_i64(lease.epoch))
            .bind(node)
            .execute(&self.inner.pool)
            .await
            .map_err(db("releasing a projection"))?;
        Ok(())
    }

    async fn save_checkpoint(
        &self,
        tx: &mut Self::Transaction,
        lease: &Lease,
        checkpoint: Checkpoint,
        processed: u64,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(self.q("save_checkpoint"))
            .bind(&lease.unit.projection)
            .bind(lease.unit.partition as i32)
            .bind(to_i64(lease.epoch))
            .bind(checkpoint.transaction_id.to_string())
            .bind(to_i64(checkpoint.position))
            .bind(to_i64(processed))
            .execute(&mut **tx)
            .await
            .map_err(db("saving a checkpoint"))?
            .rows_affected();
        Ok(updated == 1)
    }

    async fn set_state(
        &self,
        lease: &Lease,
        state: ProjectionState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(self.q("set_state"))
            .bind(&lease.unit.projection)
            .bind(lease.unit.partition as i32)
            .bind(to_i64(lease.epoch))
            .bind(state.as_str())
            .bind(error)
            .execute(&self.inner.pool)
            .await
            .map_err(db("recording a projection's state"))?;
        Ok(())
    }

    async fn units(&self, projection: Option<&str>) -> Result<Vec<UnitRecord>, StoreError> {
        let rows = sqlx::query(self.q("units"))
            .bind(projection)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db("reading projection states"))?;
        let table = self.table();
        rows.iter()
            .map(|row| {
                let get = |e| StoreError::database("reading projection states", e);
                let state: String = row.try_get("state").map_err(get)?;
                let partitions: i32 = row.try_get("partitions").map_err(get)?;
                let rebuild_total: Option<i64> = row.try_get("rebuild_total").map_err(get)?;
                Ok(UnitRecord {
                    unit: UnitId {
                        projection: row.try_get("projection").map_err(get)?,
                        partition: partition_of(row)?,
                    },
                    partitions: u32::try_from(partitions).unwrap_or(1),
                    checkpoint: Checkpoint::new(
                        txid_column(row, table)?,
                        u64_column(row, "position", table)?,
                    ),
                    owner: row.try_get("owner").map_err(get)?,
                    lease_valid: row.try_get("lease_valid").map_err(get)?,
                    epoch: u64_column(row, "epoch", table)?,
                    state: ProjectionState::parse(&state).unwrap_or(ProjectionState::Idle),
                    paused: row.try_get("paused").map_err(get)?,
                    last_error: row.try_get("last_error").map_err(get)?,
                    processed: u64_column(row, "processed", table)?,
                    rebuild_total: rebuild_total.and_then(|n| u64::try_from(n).ok()),
                    updated_at: row.try_get("updated_at").map_err(get)?,
                })
            })
            .collect()
    }

    async fn reset_projection(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
        rebuild_total: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(self.q("reset"))
            .bind(name)
            .bind(to_i64(rebuild_total))
            .execute(&mut **tx)
            .await
            .map_err(db("resetting a projection"))?;
        Ok(())
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        sqlx::query(self.q("set_paused"))
            .bind(name)
            .bind(paused)
            .execute(&self.inner.pool)
            .await
            .map_err(db("pausing a projection"))?;
        self.signal_checkpoints();
        Ok(())
    }

    async fn restart_projection(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query(self.q("restart"))
            .bind(name)
            .execute(&self.inner.pool)
            .await
            .map_err(db("restarting a projection"))?;
        self.signal_checkpoints();
        Ok(())
    }

    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let (clause, binds) = filter_sql(filter, 6);
        let sql = self
            .inner
            .projection_sql
            .count_events
            .replace("{filter}", &clause);
        let query = sqlx::query(&sql)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .bind(upto.transaction_id.to_string())
            .bind(to_i64(upto.position))
            .bind(to_i64(cap));
        let row = bind_filter(query, binds)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(db("counting events"))?;
        let count: i64 = row.try_get(0).map_err(db("counting events"))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let (clause, binds) = filter_sql(filter, 3);
        let sql = self
            .inner
            .projection_sql
            .first_pending
            .replace("{filter}", &clause);
        let query = sqlx::query(&sql)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position));
        let row = bind_filter(query, binds)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(db("reading the oldest pending event"))?;
        row.map(|row| {
            row.try_get(0)
                .map_err(db("reading the oldest pending event"))
        })
        .transpose()
    }

    async fn park(
        &self,
        tx: &mut Self::Transaction,
        dead_letter: NewDeadLetter<'_>,
    ) -> Result<(), StoreError> {
        let event = dead_letter.event;
        sqlx::query(self.q("park"))
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
        let rows = sqlx::query(self.q("dead_letters"))
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
    ) -> Result<Option<(DeadLetter, RecordedEvent)>, StoreError> {
        let Some(row) = sqlx::query(self.q("take_dead_letter"))
            .bind(to_i64(id))
            .fetch_optional(&mut **tx)
            .await
            .map_err(db("taking a dead letter"))?
        else {
            return Ok(None);
        };
        let dead_letter = dead_letter_from_row(&row, self.table())?;
        let event_row = sqlx::query(self.q("event_at"))
            .bind(dead_letter.checkpoint.transaction_id.to_string())
            .bind(to_i64(dead_letter.checkpoint.position))
            .fetch_optional(&mut **tx)
            .await
            .map_err(db("reading a parked event"))?;
        let Some(event_row) = event_row else {
            return Err(StoreError::Corrupt {
                table: self.table().to_owned(),
                what: format!("parked event at {} is missing", dead_letter.checkpoint),
            });
        };
        let event = decode_event(&event_row, self.table())?;
        Ok(Some((dead_letter, event)))
    }

    async fn note_dead_letter_failure(&self, id: u64, error: &str) -> Result<(), StoreError> {
        sqlx::query(self.q("note_dead_letter_failure"))
            .bind(to_i64(id))
            .bind(error)
            .execute(&self.inner.pool)
            .await
            .map_err(db("recording a failed retry"))?;
        Ok(())
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        let deleted = sqlx::query(self.q("discard_dead_letter"))
            .bind(to_i64(id))
            .execute(&self.inner.pool)
            .await
            .map_err(db("discarding a dead letter"))?
            .rows_affected();
        Ok(deleted == 1)
    }

    async fn inbox_claim(
        &self,
        tx: &mut Self::Transaction,
        handler: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(self.q("inbox_claim"))
            .bind(handler)
            .bind(message_id)
            .execute(&mut **tx)
            .await
            .map_err(db("recording a message in the inbox"))?
            .rows_affected();
        Ok(inserted == 1)
    }

    async fn append_in(
        &self,
        tx: &mut Self::Transaction,
        request: crate::event::AppendRequest,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.append_in_transaction(tx, request).await
    }

    fn events_committed(&self) {
        self.wake_readers();
    }

    fn waiters(&self) -> &crate::store::Waiters {
        &self.inner.waiters
    }

    fn signal_checkpoints(&self) {
        self.inner.checkpoint_wake.wake();
        if let Some(notify) = &self.inner.notify_checkpoints {
            let _ = notify.try_send(());
        }
    }

    fn checkpoint_wakeups(&self) -> Wakeups {
        self.listen();
        self.inner
            .checkpoint_wake
            .subscribe(self.inner.poll_interval)
    }

    async fn oldest_open_transaction(&self) -> Result<Option<OldestTransaction>, StoreError> {
        let row = sqlx::query(self.q("oldest_transaction"))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(db("reading pg_stat_activity"))?;
        let Some(row) = row else { return Ok(None) };
        let get = |e| StoreError::database("reading pg_stat_activity", e);
        let age: f64 = row.try_get("age_seconds").map_err(get)?;
        Ok(Some(OldestTransaction {
            pid: row.try_get("pid").map_err(get)?,
            database: row.try_get("datname").map_err(get)?,
            age: Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default(),
            state: row.try_get("state").map_err(get)?,
            query: row.try_get("query").map_err(get)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_projection_query_exists() {
        let names = Names::new("events", None).expect("valid");
        let queries = Queries::new(&names);
        for name in [
            "register",
            "partition_counts",
            "node_heartbeat",
            "claim",
            "renew",
            "release",
            "save_checkpoint",
            "set_state",
            "units",
            "reset",
            "set_paused",
            "restart",
            "park",
            "dead_letters",
            "take_dead_letter",
            "note_dead_letter_failure",
            "discard_dead_letter",
            "event_at",
            "inbox_claim",
            "oldest_transaction",
        ] {
            let sql = queries.get(name);
            assert!(!sql.is_empty(), "query `{name}` missing");
            assert!(
                !sql.contains('{'),
                "query `{name}` has an unrendered placeholder: {sql}"
            );
        }
    }
}
