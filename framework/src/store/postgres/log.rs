//! The global log on PostgreSQL: reads in `(transaction id, position)`
//! order below the oldest running transaction, the head, counts for status,
//! and the filter clauses the reads share.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{db, pg_error, to_i64, txid_column, u64_column, PostgresStore};
use crate::error::StoreError;
use crate::event::{Checkpoint, RecordedEvent};
use crate::port::log::{EventLog, LogFilter, LogWindow, OldestTransaction};
use crate::wake::Wakeups;

#[async_trait]
impl EventLog for PostgresStore {
    fn key_ring(&self) -> Option<crate::personal::KeyRing> {
        Some(PostgresStore::key_ring(self))
    }

    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let (clause, binds) = filter_sql(filter, 4, &self.inner.tags_table);
        let sql = self.inner.sql.read_log.replace("{filter}", &clause);
        let query = sqlx::query(&sql)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .bind(to_i64(limit as u64));
        let query = bind_filter(query, binds);
        let rows = query
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading the global log", e))?;
        self.decode_window(rows)
    }

    /// The head, the window and whether events are held back, in one
    /// statement.
    async fn read_window(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<LogWindow, StoreError> {
        let (clause, binds) = filter_sql(filter, 4, &self.inner.tags_table);
        let sql = self.inner.sql.read_window.replace("{filter}", &clause);
        let query = sqlx::query(&sql)
            .bind(after.transaction_id.to_string())
            .bind(to_i64(after.position))
            .bind(to_i64(limit as u64));
        let rows = bind_filter(query, binds)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading the global log", e))?;
        let table = &self.inner.events_table;
        let get = |e| pg_error("reading the global log", e);
        // The head's row is the one without an event (the last, as the
        // server appends it; found wherever it is).
        let mut marker = None;
        let mut event_rows = Vec::with_capacity(rows.len().saturating_sub(1));
        for row in rows {
            if row
                .try_get::<Option<uuid::Uuid>, _>("event_id")
                .map_err(get)?
                .is_none()
            {
                marker = Some(row);
            } else {
                event_rows.push(row);
            }
        }
        let Some(marker) = marker else {
            return Err(super::rows::corrupt(
                table,
                "the log window returned no head",
            ));
        };
        let head_txid: Option<String> = marker.try_get("head_txid").map_err(get)?;
        let head_position: Option<i64> = marker.try_get("head_position").map_err(get)?;
        let held_back: bool = marker.try_get("held_back").map_err(get)?;
        let head = match (head_txid, head_position) {
            (Some(txid), Some(position)) => Checkpoint::new(
                txid.parse().map_err(|_| {
                    super::rows::corrupt(table, &format!("transaction id `{txid}` is not a number"))
                })?,
                u64::try_from(position).map_err(|_| {
                    super::rows::corrupt(table, &format!("negative position {position}"))
                })?,
            ),
            _ => Checkpoint::START,
        };
        let returned = event_rows.len();
        let events = self.decode_window(event_rows)?;
        if !events.is_sorted_by_key(RecordedEvent::checkpoint) {
            // The branches of a UNION ALL keep their rows' order in every
            // plan PostgreSQL makes today; should one ever not, read the
            // window the plain way rather than trust it.
            tracing::warn!("a log window came back out of order; reading it again");
            let head = self.head().await?;
            let events = self.read_log(after, filter, limit).await?;
            let complete =
                events.len() < limit && events.last().is_none_or(|last| last.checkpoint() >= head);
            return Ok(LogWindow::new(head, events, complete, held_back));
        }
        // Short, and not cut by a row that does not decode.
        let complete = returned < limit && events.len() == returned;
        Ok(LogWindow::new(head, events, complete, held_back))
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        let row = sqlx::query(&self.inner.sql.head)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading the head of the log", e))?;
        match row {
            None => Ok(Checkpoint::START),
            Some(row) => Ok(Checkpoint::new(
                txid_column(&row, &self.inner.events_table)?,
                u64_column(&row, "position", &self.inner.events_table)?,
            )),
        }
    }

    /// The last committed event by log order, whether or not an open
    /// transaction still holds readers before it.
    async fn committed_head(&self) -> Result<Checkpoint, StoreError> {
        let row = sqlx::query(&self.inner.sql.committed_head)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| pg_error("reading the last committed event", e))?;
        match row {
            None => Ok(Checkpoint::START),
            Some(row) => Ok(Checkpoint::new(
                txid_column(&row, &self.inner.events_table)?,
                u64_column(&row, "position", &self.inner.events_table)?,
            )),
        }
    }

    fn wakeups(&self) -> Wakeups {
        self.listen();
        self.inner.wake.subscribe(self.inner.poll_interval)
    }

    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError> {
        let (clause, binds) = filter_sql(filter, 6, &self.inner.tags_table);
        let sql = self.inner.sql.count_events.replace("{filter}", &clause);
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
        let (clause, binds) = filter_sql(filter, 3, &self.inner.tags_table);
        let sql = self.inner.sql.first_pending.replace("{filter}", &clause);
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

    async fn oldest_open_transaction(&self) -> Result<Option<OldestTransaction>, StoreError> {
        let row = sqlx::query(&self.inner.sql.oldest_transaction)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(db("reading pg_stat_activity"))?;
        let Some(row) = row else { return Ok(None) };
        let get = |e| pg_error("reading pg_stat_activity", e);
        let age: f64 = row.try_get("age_seconds").map_err(get)?;
        Ok(Some(
            OldestTransaction::new(
                row.try_get("pid").map_err(get)?,
                row.try_get("datname").map_err(get)?,
                Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default(),
                row.try_get("state").map_err(get)?,
                row.try_get("query").map_err(get)?,
            )
            .with_query_start(row.try_get("query_start").map_err(get)?),
        ))
    }
}

/// A value bound for a [`filter_sql`] clause.
pub(super) enum FilterBind {
    Text(String),
    Texts(Vec<String>),
    Int(i64),
}

/// The `AND ...` conditions for a filter, numbering parameters from `first`.
/// One aggregate type is compared with `=`, so the planner can walk the
/// `(aggregate_type, transaction_id, position)` index in log order.
pub(super) fn filter_sql(
    filter: &LogFilter,
    first: usize,
    tags_table: &str,
) -> (String, Vec<FilterBind>) {
    let mut clause = String::new();
    let mut binds = Vec::new();
    let mut next = first;
    let mut param = |binds: &mut Vec<FilterBind>, bind: FilterBind| {
        binds.push(bind);
        next += 1;
        next - 1
    };
    match filter.aggregate_type_list() {
        [] => {}
        [one] => {
            let n = param(&mut binds, FilterBind::Text(one.clone()));
            clause.push_str(&format!(" AND e.aggregate_type = ${n}"));
        }
        many => {
            let n = param(&mut binds, FilterBind::Texts(many.to_vec()));
            clause.push_str(&format!(" AND e.aggregate_type = ANY(${n}::text[])"));
        }
    }
    if !filter.event_type_list().is_empty() {
        let n = param(
            &mut binds,
            FilterBind::Texts(filter.event_type_list().to_vec()),
        );
        clause.push_str(&format!(" AND e.event_type = ANY(${n}::text[])"));
    }
    if let Some(partition) = filter.partition() {
        let count = param(&mut binds, FilterBind::Int(i64::from(partition.count)));
        let index = param(&mut binds, FilterBind::Int(i64::from(partition.index)));
        // A function call rather than `=`: the planner has no statistics
        // for the hash and takes `=` to keep one row in 200, so it expects
        // to walk most of the log for a window and picks a parallel scan
        // (worker processes started for every batch, four times slower);
        // a boolean function call is taken to keep one row in three, near
        // the truth, and the read stays one index range scan.
        clause.push_str(&format!(
            " AND int8eq(mod(abs(hashtext(e.aggregate_id)::bigint), ${count}), ${index})"
        ));
    }
    if let Some(query) = filter.query() {
        let mut params = super::decisions::Params::new(next);
        let matching = super::decisions::query_clause(query, "e", tags_table, &mut params);
        binds.extend(params.binds);
        clause.push_str(&format!(" AND {matching}"));
    }
    (clause, binds)
}

pub(super) fn bind_filter<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    binds: Vec<FilterBind>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for bind in binds {
        query = match bind {
            FilterBind::Text(value) => query.bind(value),
            FilterBind::Texts(values) => query.bind(values),
            FilterBind::Int(value) => query.bind(value),
        };
    }
    query
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_filtered_by_a_function_call_not_an_equality() {
        // `=` on the hash would make the planner expect one row in 200 and
        // read catch-up windows with parallel workers (see `filter_sql`).
        let filter = LogFilter::all().with_partition(1, 4);
        let (clause, binds) = filter_sql(&filter, 4, "\"events_tags\"");
        assert_eq!(
            clause,
            " AND int8eq(mod(abs(hashtext(e.aggregate_id)::bigint), $4), $5)"
        );
        assert_eq!(binds.len(), 2);
    }
}
