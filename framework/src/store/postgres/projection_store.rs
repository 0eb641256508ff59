//! Transactions and the projection side for PostgreSQL: projection state
//! rows with leases and epochs, dead letters and the inbox, all in the events
//! table's schema.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use super::errors::db_or_missing;
use super::{classify, db, pg_error, to_i64, txid_column, u64_column, PostgresStore};
use crate::error::{ErrorKind, StoreError};
use crate::event::Checkpoint;
use crate::port::projections::{
    same_partitions, Checkpoints, Lease, Leases, ProjectionState, UnitError, UnitId, UnitRecord,
};
use crate::wake::Wakeups;

crate::store::sql::statements::sql_statements! {
    /// The projection side's statements, one `.sql` file each under `queries/`.
    pub(super) struct Queries in "queries/" {
        register,
        partition_counts,
        node_heartbeat,
        claim,
        renew,
        release,
        give_up,
        deregister,
        save_checkpoint,
        set_state,
        units,
        reset,
        set_paused,
        restart,
        park,
        dead_letters,
        take_dead_letter,
        note_dead_letter_failure,
        discard_dead_letter,
        inbox_claim,
        request_rebuild,
        rebuild_requests,
        take_rebuild_request,
        request_retry,
        retry_requests,
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

pub(super) fn partition_of(row: &PgRow) -> Result<u32, StoreError> {
    let partition: i32 = row
        .try_get("partition")
        .map_err(db("reading a partition"))?;
    u32::try_from(partition).map_err(|_| StoreError::Corrupt {
        table: "projections".into(),
        what: format!("negative partition {partition}"),
    })
}

impl PostgresStore {
    pub(super) fn table(&self) -> &str {
        &self.inner.events_table
    }
}

crate::store::sql::transactions::sql_transactions! {
    store: PostgresStore,
    database: Postgres,
    db: db,
    classify: classify,
    transaction: "A transaction on a pooled connection.",
    append: "If the transaction wrote before appending and another transaction appended to the same stream and committed in between, the append fails with [`StoreError::StaleTransaction`]: retry the whole transaction.",
}

#[async_trait]
impl Checkpoints for PostgresStore {
    async fn register_projection(&self, name: &str, partitions: u32) -> Result<(), StoreError> {
        let stored: Vec<i32> = sqlx::query_scalar(&self.inner.projection_sql.partition_counts)
            .bind(name)
            .fetch_all(&self.inner.pool)
            .await
            // Outflow's own tables were never created: say which.
            .map_err(db_or_missing(
                "reading a projection's partitions",
                format!("{}_projections", self.inner.events_table),
                "apply the store's migrations (PostgresStoreBuilder::migrate or \
                 PostgresStore::migrate)",
            ))?;
        same_partitions(name, stored.into_iter().map(i64::from), partitions)?;
        sqlx::query(&self.inner.projection_sql.register)
            .bind(name)
            .bind(partitions as i32)
            .execute(&self.inner.pool)
            .await
            .map_err(db("registering a projection"))?;
        Ok(())
    }

    async fn save_checkpoint(
        &self,
        tx: &mut Self::Transaction,
        lease: &Lease,
        from: Checkpoint,
        to: Checkpoint,
        processed: u64,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(&self.inner.projection_sql.save_checkpoint)
            .bind(&lease.unit.projection)
            .bind(lease.unit.partition as i32)
            .bind(to_i64(lease.epoch))
            .bind(from.transaction_id.to_string())
            .bind(to_i64(from.position))
            .bind(to.transaction_id.to_string())
            .bind(to_i64(to.position))
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
        self.write_state(lease, state, error, None).await
    }

    async fn record_state(
        &self,
        lease: &Lease,
        state: ProjectionState,
        error: Option<UnitError<'_>>,
    ) -> Result<(), StoreError> {
        let kind = error.map(|e| e.kind);
        self.write_state(lease, state, error.map(|e| e.message), kind)
            .await
    }

    async fn units(&self, projection: Option<&str>) -> Result<Vec<UnitRecord>, StoreError> {
        let rows = sqlx::query(&self.inner.projection_sql.units)
            .bind(projection)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db("reading projection states"))?;
        let table = self.table();
        rows.iter()
            .map(|row| {
                let get = |e| pg_error("reading projection states", e);
                let state: String = row.try_get("state").map_err(get)?;
                let partitions: i32 = row.try_get("partitions").map_err(get)?;
                let rebuild_total: Option<i64> = row.try_get("rebuild_total").map_err(get)?;
                let parked_txid: Option<String> = row.try_get("parked_txid").map_err(get)?;
                let parked_position: Option<i64> = row.try_get("parked_position").map_err(get)?;
                let last_parked = match (parked_txid, parked_position) {
                    (Some(txid), Some(position)) => Some(Checkpoint::new(
                        txid.parse().map_err(|_| {
                            super::rows::corrupt(
                                table,
                                &format!("dead letter transaction id `{txid}` is not a number"),
                            )
                        })?,
                        u64::try_from(position).unwrap_or(0),
                    )),
                    _ => None,
                };
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
                    error_kind: row
                        .try_get::<Option<&str>, _>("error_kind")
                        .map_err(get)?
                        .and_then(ErrorKind::from_name),
                    processed: u64_column(row, "processed", table)?,
                    rebuild_total: rebuild_total.and_then(|n| u64::try_from(n).ok()),
                    updated_at: row.try_get("updated_at").map_err(get)?,
                    last_parked,
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
        self.reset_projection_to(tx, name, Checkpoint::START, rebuild_total)
            .await
    }

    async fn reset_projection_to(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
        to: Checkpoint,
        rebuild_total: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.inner.projection_sql.reset)
            .bind(name)
            .bind(to_i64(rebuild_total))
            .bind(to.transaction_id.to_string())
            .bind(to_i64(to.position))
            .execute(&mut **tx)
            .await
            .map_err(db("resetting a projection"))?;
        Ok(())
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        sqlx::query(&self.inner.projection_sql.set_paused)
            .bind(name)
            .bind(paused)
            .execute(&self.inner.pool)
            .await
            .map_err(db("pausing a projection"))?;
        self.signal_checkpoints();
        Ok(())
    }

    async fn restart_projection(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query(&self.inner.projection_sql.restart)
            .bind(name)
            .execute(&self.inner.pool)
            .await
            .map_err(db("restarting a projection"))?;
        self.signal_checkpoints();
        Ok(())
    }

    async fn request_rebuild(&self, name: &str) -> Result<bool, StoreError> {
        let updated = sqlx::query(&self.inner.projection_sql.request_rebuild)
            .bind(name)
            .execute(&self.inner.pool)
            .await
            .map_err(db("asking for a rebuild"))?
            .rows_affected();
        self.signal_checkpoints();
        Ok(updated > 0)
    }

    async fn rebuild_requests(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(&self.inner.projection_sql.rebuild_requests)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db("reading the rebuilds asked for"))
    }

    async fn take_rebuild_request(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
    ) -> Result<bool, StoreError> {
        let taken = sqlx::query(&self.inner.projection_sql.take_rebuild_request)
            .bind(name)
            .execute(&mut **tx)
            .await
            .map_err(db("taking a rebuild asked for"))?
            .rows_affected();
        Ok(taken > 0)
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
}

#[async_trait]
impl Leases for PostgresStore {
    async fn node_heartbeat(&self, node: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let key = self.inner.presences.key(&self.inner.pool, node).await;
        let rows = sqlx::query(&self.inner.projection_sql.node_heartbeat)
            .bind(node)
            .bind(ttl.as_secs_f64())
            .bind(key)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(db("recording a node heartbeat"))?;
        let mut live = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: String = row
                .try_get("node")
                .map_err(db("recording a node heartbeat"))?;
            if name == node {
                let present: bool = row
                    .try_get("present")
                    .map_err(db("recording a node heartbeat"))?;
                if let (Some(key), false) = (key, present) {
                    self.inner.presences.lost(node, key).await;
                }
            }
            live.push(name);
        }
        Ok(live)
    }

    async fn claim(
        &self,
        unit: &UnitId,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query(&self.inner.projection_sql.claim)
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
        let rows = sqlx::query(&self.inner.projection_sql.renew)
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
        sqlx::query(&self.inner.projection_sql.release)
            .bind(&lease.unit.projection)
            .bind(lease.unit.partition as i32)
            .bind(to_i64(lease.epoch))
            .bind(node)
            .execute(&self.inner.pool)
            .await
            .map_err(db("releasing a projection"))?;
        Ok(())
    }

    async fn give_up(&self, unit: &UnitId, node: &str) -> Result<(), StoreError> {
        sqlx::query(&self.inner.projection_sql.give_up)
            .bind(&unit.projection)
            .bind(unit.partition as i32)
            .bind(node)
            .execute(&self.inner.pool)
            .await
            .map_err(db("giving up a lease"))?;
        Ok(())
    }

    async fn deregister(&self, node: &str) -> Result<(), StoreError> {
        let deregistered = sqlx::query(&self.inner.projection_sql.deregister)
            .bind(node)
            .execute(&self.inner.pool)
            .await
            .map_err(db("deregistering a node"));
        // Let the lock go even when the row could not be deleted: the other
        // nodes then find this one gone and take its units at once.
        self.inner.presences.release(node).await;
        deregistered.map(drop)
    }
}

impl PostgresStore {
    /// A transaction on a pooled connection, begun in a task of its own (see
    /// [`begin_owned`](super::errors::begin_owned)).
    pub(super) async fn begin_write(
        &self,
        operation: &'static str,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        super::errors::begin_owned(&self.inner.pool)
            .await
            .map_err(db(operation))
    }

    /// Records a unit's state, last error and its kind while `lease`'s epoch
    /// is current.
    async fn write_state(
        &self,
        lease: &Lease,
        state: ProjectionState,
        error: Option<&str>,
        kind: Option<ErrorKind>,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.inner.projection_sql.set_state)
            .bind(&lease.unit.projection)
            .bind(lease.unit.partition as i32)
            .bind(to_i64(lease.epoch))
            .bind(state.as_str())
            .bind(error)
            .bind(kind.map(ErrorKind::as_str))
            .execute(&self.inner.pool)
            .await
            .map_err(db("recording a projection's state"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Names;
    use super::*;

    #[test]
    fn every_projection_query_is_rendered() {
        let names = Names::new("events", None).expect("valid");
        let queries = Queries::new(|sql| names.render(sql));
        crate::store::sql::statements::assert_rendered(queries.statements(), &[]);
    }
}
