//! Tags, reads by query and conditional appends on PostgreSQL.
//!
//! Why a conditional append cannot miss a competing write, even one that
//! commits late: every append of tagged events holds a shared advisory lock
//! per tag from its insert to its commit; a conditional append first takes
//! its condition's keys exclusively (one tag of each query item; an item
//! without tags locks the events table against every writer instead), so
//! it waits for each in-flight writer of a matching event to finish, and no
//! new one starts until it commits. Its insert, a statement begun after the
//! locks were granted, then checks the condition against every committed
//! event: one that the read's snapshot did not see (committed after the
//! read, or by a transaction still open during it) fails the condition.

use async_trait::async_trait;
use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::log::{bind_filter, FilterBind};
use super::{pg_error, to_i64, PostgresStore};
use crate::error::StoreError;
use crate::event::{AppendRequest, Checkpoint, RecordedEvent};
use crate::port::decisions::{
    event_tags, AppendCondition, ConditionalAppend, QueryRead, ReadPosition,
};
use crate::tags::{lock_key, Query};

/// Numbers parameters as a clause is built.
pub(super) struct Params {
    next: usize,
    pub(super) binds: Vec<FilterBind>,
}

impl Params {
    pub(super) fn new(first: usize) -> Self {
        Params {
            next: first,
            binds: Vec::new(),
        }
    }

    fn push(&mut self, bind: FilterBind) -> usize {
        self.binds.push(bind);
        self.next += 1;
        self.next - 1
    }
}

impl PostgresStore {
    fn query_clause(&self, query: &Query, alias: &str, params: &mut Params) -> String {
        query_clause(query, alias, &self.inner.tags_table, params)
    }

    /// The events matching each query item, as `(transaction_id, position)`
    /// rows: an item with tags from the tags table alone (its first tag's
    /// index range, the others probed by key, its types checked on the
    /// event by key); an item without tags from the events table.
    fn item_rows(&self, query: &Query, params: &mut Params) -> String {
        let tags = &self.inner.tags_table;
        let events = self.events_sql();
        let selects: Vec<String> = query
            .items
            .iter()
            .map(|item| {
                let mut item_tags = item.tags.clone();
                item_tags.sort();
                item_tags.dedup();
                let Some((first, others)) = item_tags.split_first() else {
                    let one = Query::new().with(item.clone());
                    let clause = self.query_clause(&one, "e", params);
                    return format!(
                        "SELECT e.transaction_id, e.position FROM {events} e WHERE {clause}"
                    );
                };
                let n = params.push(FilterBind::Text(first.clone()));
                let mut select = format!(
                    "SELECT t.transaction_id, t.position FROM {tags} t WHERE t.tag = ${n}"
                );
                if !others.is_empty() {
                    let count = others.len() as i64;
                    let o = params.push(FilterBind::Texts(others.to_vec()));
                    let k = params.push(FilterBind::Int(count));
                    select.push_str(&format!(
                        " AND (SELECT count(*) FROM {tags} g WHERE g.tag = ANY(${o}::text[]) \
                         AND g.transaction_id = t.transaction_id AND g.position = t.position) = ${k}"
                    ));
                }
                if !item.types.is_empty() {
                    let y = params.push(FilterBind::Texts(item.types.clone()));
                    select.push_str(&format!(
                        " AND EXISTS (SELECT 1 FROM {events} y WHERE y.transaction_id = t.transaction_id \
                         AND y.position = t.position AND y.event_type = ANY(${y}::text[]))"
                    ));
                }
                select
            })
            .collect();
        selects.join(" UNION ")
    }

    /// The events table, quoted for SQL.
    fn events_sql(&self) -> String {
        self.inner.events_sql.clone()
    }

    /// `NOT EXISTS` an event matching the condition that its read did not
    /// see (and that this transaction did not write).
    fn condition_clause(&self, condition: &AppendCondition, params: &mut Params) -> String {
        let after = match condition.after.snapshot() {
            Some(snapshot) => {
                let s = params.push(FilterBind::Text(snapshot.to_owned()));
                format!(
                    "c.transaction_id >= pg_snapshot_xmin(${s}::text::pg_snapshot) \
                     AND NOT pg_visible_in_snapshot(c.transaction_id, ${s}::text::pg_snapshot)"
                )
            }
            None => {
                let checkpoint = condition.after.checkpoint();
                let x = params.push(FilterBind::Text(checkpoint.transaction_id.to_string()));
                let p = params.push(FilterBind::Int(to_i64(checkpoint.position)));
                format!("(c.transaction_id, c.position) > (${x}::text::xid8, ${p})")
            }
        };
        let matching = self.query_clause(&condition.query, "c", params);
        format!(
            "NOT EXISTS (SELECT 1 FROM {events} c WHERE {after} \
             AND c.transaction_id <> pg_current_xact_id() AND {matching})",
            events = self.events_sql()
        )
    }

    /// Takes the append's locks: its condition's keys exclusively and its
    /// events' tags shared, in key order; then, when an item of the
    /// condition has no tags, the events table against every writer (after
    /// the keys: a tagged writer takes its key before its insert needs the
    /// table, so the other order could wait in a circle). A condition needs
    /// READ COMMITTED: its check must see what committed while it waited.
    async fn lock_tags(
        &self,
        connection: &mut PgConnection,
        tags: &[Vec<String>],
        condition: Option<&AppendCondition>,
    ) -> Result<(), StoreError> {
        let table = &self.inner.events_table;
        let mut keys: std::collections::BTreeMap<i64, bool> = std::collections::BTreeMap::new();
        if let Some(condition) = condition {
            for item in &condition.query.items {
                if let Some(tag) = item.tags.iter().min() {
                    keys.insert(lock_key(table, tag), true);
                }
            }
        }
        for tag in tags.iter().flatten() {
            keys.entry(lock_key(table, tag)).or_insert(false);
        }
        if !keys.is_empty() || condition.is_some() {
            let (keys, exclusive): (Vec<i64>, Vec<bool>) = keys.into_iter().unzip();
            let isolation: String = sqlx::query_scalar(&self.inner.sql.tag_locks)
                .bind(keys)
                .bind(exclusive)
                .fetch_one(&mut *connection)
                .await
                .map_err(|e| pg_error("locking an append's tags", e))?;
            if condition.is_some() && isolation != "read committed" {
                return Err(StoreError::Unsupported {
                    what: "a conditional append in a repeatable read or serializable transaction",
                    reason: "its check must see what other transactions committed while it waited \
                             for their locks; run it in a READ COMMITTED transaction (the default)",
                });
            }
        }
        if let Some(condition) = condition {
            if condition.query.items.iter().any(|i| i.tags.is_empty()) {
                sqlx::query(&format!(
                    "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
                    self.events_sql()
                ))
                .execute(&mut *connection)
                .await
                .map_err(|e| pg_error("locking the events table for a condition", e))?;
            }
        }
        Ok(())
    }

    /// Appends with tags and an optional condition on `connection`, inside
    /// a transaction; with `claim`, claims that command id in the same
    /// statement.
    async fn append_tagged_on(
        &self,
        connection: &mut PgConnection,
        request: AppendRequest,
        tags: Vec<Vec<String>>,
        condition: Option<&AppendCondition>,
        claim: Option<uuid::Uuid>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if let Some(condition) = condition {
            condition.query.validate()?;
        }
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let tags = event_tags(&request, tags)?;
        self.lock_tags(connection, &tags, condition).await?;
        let count = request.events.len();
        let mut types = Vec::with_capacity(count);
        let mut versions = Vec::with_capacity(count);
        let mut payloads = Vec::with_capacity(count);
        let mut metadata = Vec::with_capacity(count);
        let mut ids = Vec::with_capacity(count);
        let mut correlations = Vec::with_capacity(count);
        let mut causations = Vec::with_capacity(count);
        for event in &request.events {
            types.push(event.event_type.clone());
            versions.push(event.event_version.clone());
            payloads.push(event.payload.to_string());
            metadata.push(serde_json::to_string(&event.metadata).map_err(|source| {
                StoreError::Serialize {
                    what: "event metadata",
                    aggregate_type: request.aggregate_type.clone(),
                    aggregate_id: request.aggregate_id.clone(),
                    source,
                }
            })?);
            ids.push(event.event_id);
            correlations.push(event.correlation_id);
            causations.push(event.causation_id);
        }
        let mut tag_list = Vec::new();
        let mut tag_index = Vec::new();
        for (i, list) in tags.iter().enumerate() {
            for tag in list {
                tag_list.push(tag.clone());
                tag_index.push(i as i64 + 1);
            }
        }
        let mut params = Params::new(14);
        let clause = match condition {
            Some(condition) => self.condition_clause(condition, &mut params),
            None => "TRUE".to_owned(),
        };
        let sql = self.inner.sql.append_tagged.replace("{condition}", &clause);
        let query = sqlx::query(&sql)
            .bind(&request.aggregate_type)
            .bind(&request.aggregate_id)
            .bind(to_i64(request.expected_version))
            .bind(&types)
            .bind(&versions)
            .bind(&payloads)
            .bind(&metadata)
            .bind(&ids)
            .bind(&correlations)
            .bind(&causations)
            .bind(&tag_list)
            .bind(&tag_index)
            .bind(claim);
        let rows = match bind_filter(query, params.binds)
            .fetch_all(&mut *connection)
            .await
        {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                return Err(StoreError::Conflict {
                    aggregate_type: request.aggregate_type,
                    aggregate_id: request.aggregate_id,
                    expected: request.expected_version,
                    actual: None,
                })
            }
            Err(e) => return Err(pg_error("appending tagged events", e)),
        };
        if rows.len() != count {
            if let Some(condition) = condition {
                if self.condition_failed(connection, condition).await? {
                    return Err(StoreError::ConditionFailed {
                        query: condition.query.to_string(),
                        after: condition.after.checkpoint(),
                    });
                }
            }
            return Err(self.refusal(connection, request).await);
        }
        if claim.is_some() {
            let claimed: i64 = rows
                .first()
                .map(|row| row.try_get("claimed"))
                .transpose()
                .map_err(|e| pg_error("claiming a command id", e))?
                .unwrap_or(0);
            if claimed == 0 {
                // An outcome for this command is stored: the caller rolls
                // back, as after claim_command.sql.
                let version = request.expected_version + count as u64;
                return Err(StoreError::Conflict {
                    aggregate_type: request.aggregate_type,
                    aggregate_id: request.aggregate_id,
                    expected: version.saturating_sub(1),
                    actual: None,
                });
            }
        }
        self.appended_in_transaction();
        self.recorded(request, &rows)
    }

    /// Whether an event matching `condition` was appended that its read
    /// did not see.
    async fn condition_failed(
        &self,
        connection: &mut PgConnection,
        condition: &AppendCondition,
    ) -> Result<bool, StoreError> {
        let mut params = Params::new(1);
        let clause = self.condition_clause(condition, &mut params);
        let sql = format!("SELECT NOT {clause} AS failed");
        let row = bind_filter(sqlx::query(&sql), params.binds)
            .fetch_one(&mut *connection)
            .await
            .map_err(|e| pg_error("checking an append's condition", e))?;
        row.try_get::<bool, _>("failed")
            .map_err(|e| pg_error("checking an append's condition", e))
    }
}

/// `(item or item ...)` over the events row `alias`: its type among the
/// item's, and each of the item's tags among its rows in the tags
/// table. `FALSE` for an empty query.
pub(super) fn query_clause(
    query: &Query,
    alias: &str,
    tags_table: &str,
    params: &mut Params,
) -> String {
    if query.items.is_empty() {
        return "FALSE".to_owned();
    }
    let items: Vec<String> = query
        .items
        .iter()
        .map(|item| {
            let mut parts = Vec::new();
            if !item.types.is_empty() {
                let n = params.push(FilterBind::Texts(item.types.clone()));
                parts.push(format!("{alias}.event_type = ANY(${n}::text[])"));
            }
            let mut tags = item.tags.clone();
            tags.sort();
            tags.dedup();
            if !tags.is_empty() {
                let count = tags.len() as i64;
                let n = params.push(FilterBind::Texts(tags));
                let k = params.push(FilterBind::Int(count));
                parts.push(format!(
                    "(SELECT count(*) FROM {tags} g WHERE g.tag = ANY(${n}::text[]) \
                     AND g.transaction_id = {alias}.transaction_id \
                     AND g.position = {alias}.position) = ${k}",
                    tags = tags_table
                ));
            }
            if parts.is_empty() {
                "TRUE".to_owned()
            } else {
                format!("({})", parts.join(" AND "))
            }
        })
        .collect();
    format!("({})", items.join(" OR "))
}

#[async_trait]
impl ConditionalAppend for PostgresStore {
    async fn read_query(
        &self,
        query: &Query,
        stream: Option<(&str, &str)>,
    ) -> Result<QueryRead, StoreError> {
        query.validate()?;
        let mut params = Params::new(3);
        let matching = if query.is_empty() {
            "SELECT NULL::xid8 AS transaction_id, NULL::bigint AS position WHERE FALSE".to_owned()
        } else {
            self.item_rows(query, &mut params)
        };
        let events = self.events_sql();
        let sql = format!(
            "SELECT s.snapshot, s.version, x.* \
               FROM (SELECT pg_current_snapshot()::text AS snapshot, \
                            COALESCE((SELECT v.sequence FROM {events} v \
                                       WHERE v.aggregate_type = $1 AND v.aggregate_id = $2 \
                                       ORDER BY v.sequence DESC LIMIT 1), 0) AS version) s \
               LEFT JOIN LATERAL ( \
                    SELECT {columns}, e.transaction_id AS log_tx \
                      FROM ({matching}) m \
                      JOIN {events} e ON e.transaction_id = m.transaction_id \
                                     AND e.position = m.position) x ON TRUE \
              ORDER BY x.log_tx, x.position",
            columns = include_str!("queries/columns.sql").trim_end(),
        );
        let (stream_type, stream_id) = match stream {
            Some((t, i)) => (Some(t), Some(i)),
            None => (None, None),
        };
        let rows = bind_filter(
            sqlx::query(&sql).bind(stream_type).bind(stream_id),
            params.binds,
        )
        .fetch_all(&self.inner.pool)
        .await
        .map_err(|e| pg_error("reading events by query", e))?;
        let get = |e| pg_error("reading events by query", e);
        let Some(first) = rows.first() else {
            return Err(pg_error(
                "reading events by query",
                sqlx::Error::RowNotFound,
            ));
        };
        let snapshot: String = first.try_get("snapshot").map_err(get)?;
        let version: i64 = first.try_get("version").map_err(get)?;
        let mut found = Vec::with_capacity(rows.len());
        for row in &rows {
            let present: Option<uuid::Uuid> = row.try_get("event_id").map_err(get)?;
            if present.is_some() {
                found.push(super::rows::decode_event(row, &self.inner.events_table)?);
            }
        }
        let checkpoint = found
            .last()
            .map_or(Checkpoint::START, RecordedEvent::checkpoint);
        Ok(QueryRead {
            events: found,
            position: ReadPosition::read(checkpoint, Some(snapshot)),
            stream_version: u64::try_from(version).unwrap_or(0),
        })
    }

    async fn tag_existing(&self, tags: &[(Checkpoint, Vec<String>)]) -> Result<u64, StoreError> {
        let mut lists = Vec::with_capacity(tags.len());
        let mut tag_list = Vec::new();
        let mut transactions = Vec::new();
        let mut positions = Vec::new();
        for (checkpoint, list) in tags {
            let list = crate::tags::normalized_tags(list.clone())
                .map_err(|reason| StoreError::InvalidQuery { reason })?;
            for tag in &list {
                tag_list.push(tag.clone());
                transactions.push(checkpoint.transaction_id.to_string());
                positions.push(to_i64(checkpoint.position));
            }
            lists.push(list);
        }
        if tag_list.is_empty() {
            return Ok(0);
        }
        let mut tx = crate::port::events::Transactional::begin(self).await?;
        self.lock_tags(&mut tx, &lists, None).await?;
        let sql = format!(
            "INSERT INTO {tags} (tag, transaction_id, position) \
             SELECT t.tag, t.tx::xid8, t.pos \
               FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS t(tag, tx, pos) \
              WHERE EXISTS (SELECT 1 FROM {events} e \
                             WHERE e.transaction_id = t.tx::xid8 AND e.position = t.pos) \
             ON CONFLICT DO NOTHING",
            tags = self.inner.tags_table,
            events = self.events_sql()
        );
        let done = sqlx::query(&sql)
            .bind(&tag_list)
            .bind(&transactions)
            .bind(&positions)
            .execute(&mut *tx)
            .await
            .map_err(|e| pg_error("tagging existing events", e))?;
        crate::port::events::Transactional::commit(self, tx).await?;
        Ok(done.rows_affected())
    }

    async fn append_tagged_in(
        &self,
        tx: &mut Self::Transaction,
        request: AppendRequest,
        tags: Vec<Vec<String>>,
        condition: Option<&AppendCondition>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.append_tagged_on(tx, request, tags, condition, None)
            .await
    }

    async fn append_tagged_claiming_in(
        &self,
        tx: &mut Self::Transaction,
        request: AppendRequest,
        tags: Vec<Vec<String>>,
        condition: Option<&AppendCondition>,
        command_id: uuid::Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if request.events.is_empty() {
            // Nothing to write: the claim alone, as the default does.
            return crate::port::decisions::append_then_claim(
                self, tx, request, tags, condition, command_id,
            )
            .await;
        }
        self.append_tagged_on(tx, request, tags, condition, Some(command_id))
            .await
    }
}
