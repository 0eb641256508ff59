//! Transactions and the projection side for SQLite: the units' state rows
//! with their epochs, the leases kept in a table of their own, the nodes'
//! heartbeats, dead letters and the inbox.
//!
//! Every write goes through the store's single writer connection, either in
//! a caller's transaction (checkpoints, resets, parking, taking a dead
//! letter, the inbox) or in a short transaction of its own; reads of state
//! for operators (units, dead letters) use the read-only connections. SQLite
//! runs one write transaction at a time, so a statement that checks a unit
//! and then changes it can never interleave with another writer's.
//!
//! Times an operator reads (`updated_at`, the dead letters' failure times,
//! `handled_at`) are RFC 3339 text; lease deadlines and heartbeats are unix
//! milliseconds computed here and compared with a bound `now`. SQLite has no
//! server clock to ask, but the processes sharing a file run on one machine
//! and so read the same clock.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite};

use super::errors::db_or_missing;
use super::rows::{corrupt, time_column, time_text, u64_column};
use super::{classify, db, to_i64, SqliteStore};
use crate::error::{ErrorKind, StoreError};
use crate::event::Checkpoint;
use crate::port::projections::{
    same_partitions, Checkpoints, Lease, Leases, ProjectionState, UnitError, UnitId, UnitRecord,
};
use crate::wake::Wakeups;

/// Now, in unix milliseconds: how lease deadlines and heartbeats are stored.
fn now_millis() -> i64 {
    Utc::now().timestamp_millis()
}

/// A duration in milliseconds, saturating.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// An integer column that must fit a `u32` (partitions, attempts).
pub(super) fn u32_column(
    row: &SqliteRow,
    column: &'static str,
    table: &str,
    operation: &'static str,
) -> Result<u32, StoreError> {
    let value: i64 = row.try_get(column).map_err(db(operation))?;
    u32::try_from(value).map_err(|_| corrupt(table, &format!("{column} {value} is out of range")))
}

/// A 0/1 integer column.
fn flag_column(
    row: &SqliteRow,
    column: &'static str,
    operation: &'static str,
) -> Result<bool, StoreError> {
    let value: i64 = row.try_get(column).map_err(db(operation))?;
    Ok(value != 0)
}

/// A lease from a row with `epoch`, `transaction_id`, `position` and
/// `paused`.
fn lease_from_row(
    row: &SqliteRow,
    unit: UnitId,
    table: &str,
    operation: &'static str,
) -> Result<Lease, StoreError> {
    Ok(Lease {
        unit,
        epoch: u64_column(row, "epoch", table)?,
        checkpoint: Checkpoint::new(
            u64_column(row, "transaction_id", table)?,
            u64_column(row, "position", table)?,
        ),
        paused: flag_column(row, "paused", operation)?,
    })
}

/// A unit id from a row with `projection` and `partition`.
pub(super) fn unit_from_row(
    row: &SqliteRow,
    table: &str,
    operation: &'static str,
) -> Result<UnitId, StoreError> {
    Ok(UnitId {
        projection: row.try_get("projection").map_err(db(operation))?,
        partition: u32_column(row, "partition", table, operation)?,
    })
}

/// A unit's state row joined with its lease, as [`UNITS`] selects it.
fn unit_record_from_row(row: &SqliteRow, table: &str) -> Result<UnitRecord, StoreError> {
    const OPERATION: &str = "reading projection states";
    let get = || db(OPERATION);
    let state: String = row.try_get("state").map_err(get())?;
    let rebuild_total: Option<i64> = row.try_get("rebuild_total").map_err(get())?;
    let rebuild_total = rebuild_total
        .map(|total| {
            u64::try_from(total)
                .map_err(|_| corrupt(table, &format!("negative rebuild_total {total}")))
        })
        .transpose()?;
    let updated_at: String = row.try_get("updated_at").map_err(get())?;
    let parked_transaction_id: Option<i64> = row.try_get("parked_transaction_id").map_err(get())?;
    let parked_position: Option<i64> = row.try_get("parked_position").map_err(get())?;
    let last_parked = match (parked_transaction_id, parked_position) {
        (Some(transaction_id), Some(position)) => Some(Checkpoint::new(
            u64::try_from(transaction_id).unwrap_or(0),
            u64::try_from(position).unwrap_or(0),
        )),
        _ => None,
    };
    Ok(UnitRecord {
        unit: unit_from_row(row, table, OPERATION)?,
        partitions: u32_column(row, "partitions", table, OPERATION)?,
        checkpoint: Checkpoint::new(
            u64_column(row, "transaction_id", table)?,
            u64_column(row, "position", table)?,
        ),
        owner: row.try_get("owner").map_err(get())?,
        lease_valid: flag_column(row, "lease_valid", OPERATION)?,
        epoch: u64_column(row, "epoch", table)?,
        // As the PostgreSQL backend does: a state this version does not
        // know reads as idle.
        state: ProjectionState::parse(&state).unwrap_or(ProjectionState::Idle),
        paused: flag_column(row, "paused", OPERATION)?,
        last_error: row.try_get("last_error").map_err(get())?,
        error_kind: row
            .try_get::<Option<&str>, _>("error_kind")
            .map_err(get())?
            .and_then(ErrorKind::from_name),
        processed: u64_column(row, "processed", table)?,
        rebuild_total,
        updated_at: time_column(&updated_at, table)?,
        last_parked,
    })
}

impl SqliteStore {
    /// The unquoted name of the projections table, for errors.
    fn projections_table(&self) -> String {
        self.inner.tables.companion("projections")
    }

    /// The unquoted name of the dead letters table, for errors.
    pub(super) fn dead_letters_table(&self) -> String {
        self.inner.tables.companion("dead_letters")
    }

    /// A write transaction on the writer connection. `BEGIN IMMEDIATE`
    /// takes SQLite's write lock at once, so the transaction never fails
    /// half-way because another process started writing.
    pub(super) async fn begin_write(
        &self,
        operation: &'static str,
    ) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        begin_immediate(&self.inner.writer)
            .await
            .map_err(db(operation))
    }
}

/// `BEGIN IMMEDIATE` on `pool`, in a task of its own: the driver checks a
/// custom `BEGIN` after SQLite ran it, and a caller cancelled between the
/// two (a dropped request, an aborted worker) would leave the connection
/// inside a transaction that no `Transaction` owns — every later write on
/// it swallowed. The task always finishes, and a transaction nobody takes
/// is dropped there, which rolls it back.
pub(super) async fn begin_immediate(
    pool: &sqlx::SqlitePool,
) -> Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error> {
    let pool = pool.clone();
    match tokio::spawn(async move { pool.begin_with("BEGIN IMMEDIATE").await }).await {
        Ok(result) => result,
        Err(join) => Err(sqlx::Error::WorkerCrashed).inspect_err(|_| {
            tracing::error!(error = %join, "the task starting a SQLite transaction failed");
        }),
    }
}

crate::store::sql::transactions::sql_transactions! {
    store: SqliteStore,
    database: Sqlite,
    db: db,
    classify: classify,
    transaction: "A write transaction: it holds the writer connection (and SQLite's write lock) until it commits or is dropped, so keep it short and do not call the store's other writing methods while holding it.",
    append: "The transaction holds SQLite's write lock from its start, so no other append can commit in between: the stream's version checked here is still its version at commit.",
}

#[async_trait]
impl Checkpoints for SqliteStore {
    /// Checks the stored partition count and creates the missing rows in one
    /// write transaction, so two processes registering a projection at once
    /// with different counts cannot both succeed.
    async fn register_projection(&self, name: &str, partitions: u32) -> Result<(), StoreError> {
        let mut tx = self.begin_write("registering a projection").await?;
        let stored: Vec<i64> = sqlx::query_scalar(&self.inner.queries.partition_counts)
            .bind(name)
            .fetch_all(&mut *tx)
            .await
            // Outflow's own tables were never created: say which.
            .map_err(db_or_missing(
                "reading a projection's partitions",
                self.projections_table(),
                "apply the store's migrations (SqliteStoreBuilder::migrate)",
            ))?;
        same_partitions(name, stored, partitions)?;
        sqlx::query(&self.inner.queries.register)
            .bind(name)
            .bind(i64::from(partitions))
            .bind(time_text(Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(db("registering a projection"))?;
        tx.commit()
            .await
            .map_err(db("committing a projection's registration"))
    }

    async fn save_checkpoint(
        &self,
        tx: &mut Self::Transaction,
        lease: &Lease,
        from: Checkpoint,
        to: Checkpoint,
        processed: u64,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(&self.inner.queries.save_checkpoint)
            .bind(&lease.unit.projection)
            .bind(i64::from(lease.unit.partition))
            .bind(to_i64(lease.epoch))
            .bind(to_i64(from.transaction_id))
            .bind(to_i64(from.position))
            .bind(to_i64(to.transaction_id))
            .bind(to_i64(to.position))
            .bind(to_i64(processed))
            .bind(time_text(Utc::now()))
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
        let rows = sqlx::query(&self.inner.queries.units)
            .bind(projection)
            .bind(now_millis())
            .fetch_all(&self.inner.readers)
            .await
            .map_err(db("reading projection states"))?;
        let table = self.projections_table();
        rows.iter()
            .map(|row| unit_record_from_row(row, &table))
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
        sqlx::query(&self.inner.queries.reset)
            .bind(name)
            .bind(to_i64(rebuild_total))
            .bind(time_text(Utc::now()))
            .bind(to_i64(to.transaction_id))
            .bind(to_i64(to.position))
            .execute(&mut **tx)
            .await
            .map_err(db("resetting a projection"))?;
        Ok(())
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        sqlx::query(&self.inner.queries.set_paused)
            .bind(name)
            .bind(paused)
            .bind(time_text(Utc::now()))
            .execute(&self.inner.writer)
            .await
            .map_err(db("pausing a projection"))?;
        self.signal_checkpoints();
        Ok(())
    }

    async fn restart_projection(&self, name: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write("restarting a projection").await?;
        sqlx::query(&self.inner.queries.restart_leases)
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db("freeing a restarted projection's leases"))?;
        sqlx::query(&self.inner.queries.restart)
            .bind(name)
            .bind(time_text(Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(db("restarting a projection"))?;
        tx.commit()
            .await
            .map_err(db("committing a projection's restart"))?;
        self.signal_checkpoints();
        Ok(())
    }

    async fn request_rebuild(&self, name: &str) -> Result<bool, StoreError> {
        let updated = sqlx::query(&self.inner.queries.request_rebuild)
            .bind(name)
            .bind(time_text(Utc::now()))
            .execute(&self.inner.writer)
            .await
            .map_err(db("asking for a rebuild"))?
            .rows_affected();
        self.signal_checkpoints();
        Ok(updated > 0)
    }

    async fn rebuild_requests(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(&self.inner.queries.rebuild_requests)
            .fetch_all(&self.inner.readers)
            .await
            .map_err(db("reading the rebuilds asked for"))
    }

    async fn take_rebuild_request(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
    ) -> Result<bool, StoreError> {
        let taken = sqlx::query(&self.inner.queries.take_rebuild_request)
            .bind(name)
            .execute(&mut **tx)
            .await
            .map_err(db("taking a rebuild asked for"))?
            .rows_affected();
        Ok(taken > 0)
    }

    fn signal_checkpoints(&self) {
        self.inner.checkpoint_wake.wake();
    }

    fn checkpoint_wakeups(&self) -> Wakeups {
        self.inner
            .checkpoint_wake
            .subscribe(self.inner.poll_interval)
    }
}

#[async_trait]
impl Leases for SqliteStore {
    async fn node_heartbeat(&self, node: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let now = now_millis();
        sqlx::query(&self.inner.queries.node_heartbeat)
            .bind(node)
            .bind(now)
            .execute(&self.inner.writer)
            .await
            .map_err(db("recording a node heartbeat"))?;
        sqlx::query_scalar(&self.inner.queries.live_nodes)
            .bind(node)
            .bind(now.saturating_sub(millis(ttl)))
            .fetch_all(&self.inner.readers)
            .await
            .map_err(db("listing live nodes"))
    }

    /// The unit's row and its lease are written in one write transaction.
    /// A batch in flight is never claimed from under it: the batch holds the
    /// file's only write lock until it ends.
    async fn claim(
        &self,
        unit: &UnitId,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        const OPERATION: &str = "claiming a projection";
        let now = now_millis();
        let mut tx = self.begin_write(OPERATION).await?;
        let row = sqlx::query(&self.inner.queries.claim)
            .bind(&unit.projection)
            .bind(i64::from(unit.partition))
            .bind(node)
            .bind(now)
            .bind(time_text(Utc::now()))
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(OPERATION))?;
        let lease = match row {
            None => None,
            Some(row) => {
                let lease =
                    lease_from_row(&row, unit.clone(), &self.projections_table(), OPERATION)?;
                sqlx::query(&self.inner.queries.lease)
                    .bind(&unit.projection)
                    .bind(i64::from(unit.partition))
                    .bind(node)
                    .bind(now.saturating_add(millis(ttl)))
                    .execute(&mut *tx)
                    .await
                    .map_err(db("recording a lease"))?;
                Some(lease)
            }
        };
        tx.commit().await.map_err(db("committing a claim"))?;
        Ok(lease)
    }

    /// Only the leases table is written. SQLite has one writer at a time,
    /// though: a renewal queues behind a batch that is committing on this
    /// process's writer connection (or another process's write transaction)
    /// like every other write.
    async fn renew(&self, node: &str, ttl: Duration) -> Result<Vec<Lease>, StoreError> {
        const OPERATION: &str = "renewing leases";
        let now = now_millis();
        let mut tx = self.begin_write(OPERATION).await?;
        sqlx::query(&self.inner.queries.renew)
            .bind(node)
            .bind(now)
            .bind(now.saturating_add(millis(ttl)))
            .execute(&mut *tx)
            .await
            .map_err(db(OPERATION))?;
        let rows = sqlx::query(&self.inner.queries.renewed)
            .bind(node)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(db(OPERATION))?;
        tx.commit().await.map_err(db("committing renewed leases"))?;
        let table = self.projections_table();
        rows.iter()
            .map(|row| {
                let unit = unit_from_row(row, &table, OPERATION)?;
                lease_from_row(row, unit, &table, OPERATION)
            })
            .collect()
    }

    async fn release(&self, lease: &Lease, node: &str) -> Result<(), StoreError> {
        sqlx::query(&self.inner.queries.release)
            .bind(&lease.unit.projection)
            .bind(i64::from(lease.unit.partition))
            .bind(to_i64(lease.epoch))
            .bind(node)
            .execute(&self.inner.writer)
            .await
            .map_err(db("releasing a projection"))?;
        Ok(())
    }

    async fn give_up(&self, unit: &UnitId, node: &str) -> Result<(), StoreError> {
        sqlx::query(&self.inner.queries.give_up)
            .bind(&unit.projection)
            .bind(i64::from(unit.partition))
            .bind(node)
            .execute(&self.inner.writer)
            .await
            .map_err(db("giving up a lease"))?;
        Ok(())
    }

    async fn deregister(&self, node: &str) -> Result<(), StoreError> {
        const OPERATION: &str = "deregistering a node";
        let mut tx = self.begin_write(OPERATION).await?;
        for statement in [
            &self.inner.queries.free_node_leases,
            &self.inner.queries.delete_node,
        ] {
            sqlx::query(statement)
                .bind(node)
                .execute(&mut *tx)
                .await
                .map_err(db(OPERATION))?;
        }
        tx.commit().await.map_err(db(OPERATION))?;
        Ok(())
    }
}

impl SqliteStore {
    /// Records a unit's state, last error and its kind while `lease`'s epoch
    /// is current.
    async fn write_state(
        &self,
        lease: &Lease,
        state: ProjectionState,
        error: Option<&str>,
        kind: Option<ErrorKind>,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.inner.queries.set_state)
            .bind(&lease.unit.projection)
            .bind(i64::from(lease.unit.partition))
            .bind(to_i64(lease.epoch))
            .bind(state.as_str())
            .bind(error)
            .bind(time_text(Utc::now()))
            .bind(kind.map(ErrorKind::as_str))
            .execute(&self.inner.writer)
            .await
            .map_err(db("recording a projection's state"))?;
        Ok(())
    }
}
