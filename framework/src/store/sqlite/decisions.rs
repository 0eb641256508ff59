//! Tags, reads by query and conditional appends on SQLite.
//!
//! A write transaction holds the file's write lock from its start (`BEGIN
//! IMMEDIATE`), and positions are numbered under it: the condition is
//! checked and the events written with no other writer in between, and an
//! event the read did not see has a higher position than every event it
//! saw.

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::rows::{decode_event, COLUMNS};
use super::{db, to_i64, SqliteStore};
use crate::error::StoreError;
use crate::event::{AppendRequest, Checkpoint, RecordedEvent};
use crate::port::decisions::{
    event_tags, AppendCondition, ConditionalAppend, QueryRead, ReadPosition,
};
use crate::tags::Query;

/// Tag rows per INSERT statement (two values each).
const TAG_CHUNK: usize = 400;

/// Numbers `?N` parameters as a clause is built.
pub(super) struct Params {
    next: usize,
    pub(super) binds: Vec<String>,
}

impl Params {
    pub(super) fn new(first: usize) -> Self {
        Params {
            next: first,
            binds: Vec::new(),
        }
    }

    fn push(&mut self, bind: String) -> usize {
        self.binds.push(bind);
        self.next += 1;
        self.next - 1
    }

    fn list(&mut self, values: &[String]) -> String {
        values
            .iter()
            .map(|v| format!("?{}", self.push(v.clone())))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn bind<'q>(
        self,
        mut query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
        for bind in self.binds {
            query = query.bind(bind);
        }
        query
    }
}

impl SqliteStore {
    fn query_clause(&self, query: &Query, alias: &str, params: &mut Params) -> String {
        query_clause(query, alias, &self.inner.tables.render("{tags}"), params)
    }

    /// Whether an event matching `condition` was appended after its read.
    async fn condition_failed(
        &self,
        connection: &mut SqliteConnection,
        condition: &AppendCondition,
    ) -> Result<bool, StoreError> {
        let mut params = Params::new(2);
        let clause = self.query_clause(&condition.query, "c", &mut params);
        let sql = self.inner.tables.render(&format!(
            "SELECT EXISTS (SELECT 1 FROM {{events}} c WHERE c.position > ?1 AND {clause})"
        ));
        let query =
            sqlx::query_scalar::<_, i64>(&sql).bind(to_i64(condition.after.checkpoint().position));
        let mut query = query;
        for bind in params.binds {
            query = query.bind(bind);
        }
        let found = query
            .fetch_one(&mut *connection)
            .await
            .map_err(db("checking an append's condition"))?;
        Ok(found != 0)
    }

    /// Writes each event's tags.
    async fn insert_tags(
        &self,
        connection: &mut SqliteConnection,
        written: &[RecordedEvent],
        tags: &[Vec<String>],
    ) -> Result<(), StoreError> {
        let rows: Vec<(&str, i64)> = written
            .iter()
            .zip(tags)
            .flat_map(|(event, list)| {
                list.iter()
                    .map(move |tag| (tag.as_str(), to_i64(event.position)))
            })
            .collect();
        for chunk in rows.chunks(TAG_CHUNK) {
            let values = (0..chunk.len())
                .map(|i| format!("(?{}, ?{})", 2 * i + 1, 2 * i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = self.inner.tables.render(&format!(
                "INSERT INTO {{tags}} (tag, position) VALUES {values}"
            ));
            let mut query = sqlx::query(&sql);
            for (tag, position) in chunk {
                query = query.bind(*tag).bind(*position);
            }
            query
                .execute(&mut *connection)
                .await
                .map_err(db("writing events' tags"))?;
        }
        Ok(())
    }
}

/// `(item OR item ...)` over the events row `alias`; `0` (false) for an
/// empty query.
pub(super) fn query_clause(
    query: &Query,
    alias: &str,
    tags_table: &str,
    params: &mut Params,
) -> String {
    if query.items.is_empty() {
        return "0".to_owned();
    }
    let items: Vec<String> = query
        .items
        .iter()
        .map(|item| {
            let mut parts = Vec::new();
            if !item.types.is_empty() {
                parts.push(format!(
                    "{alias}.event_type IN ({})",
                    params.list(&item.types)
                ));
            }
            let mut tags = item.tags.clone();
            tags.sort();
            tags.dedup();
            if !tags.is_empty() {
                let count = tags.len();
                let list = params.list(&tags);
                parts.push(format!(
                    "(SELECT count(*) FROM {tags_table} g WHERE g.position = {alias}.position \
                     AND g.tag IN ({list})) = {count}"
                ));
            }
            if parts.is_empty() {
                "1".to_owned()
            } else {
                format!("({})", parts.join(" AND "))
            }
        })
        .collect();
    format!("({})", items.join(" OR "))
}

#[async_trait]
impl ConditionalAppend for SqliteStore {
    async fn read_query(
        &self,
        query: &Query,
        stream: Option<(&str, &str)>,
    ) -> Result<QueryRead, StoreError> {
        query.validate()?;
        let mut params = Params::new(3);
        let matching = if query.is_empty() {
            "SELECT NULL WHERE 0".to_owned()
        } else {
            let tags_table = self.inner.tables.render("{tags}");
            query
                .items
                .iter()
                .map(|item| {
                    let one = Query::new().with(item.clone());
                    let clause = self.query_clause(&one, "e", &mut params);
                    match item.tags.iter().min() {
                        Some(first) => {
                            let n = params.push(first.clone());
                            format!(
                                "SELECT e.position FROM {tags_table} t \
                                 JOIN {{events}} e ON e.position = t.position \
                                 WHERE t.tag = ?{n} AND {clause}"
                            )
                        }
                        None => format!("SELECT e.position FROM {{events}} e WHERE {clause}"),
                    }
                })
                .collect::<Vec<_>>()
                .join(" UNION ")
        };
        let sql = self.inner.tables.render(&format!(
            "SELECT s.version, s.head, x.* \
               FROM (SELECT COALESCE((SELECT v.sequence FROM {{events}} v \
                                       WHERE v.aggregate_type = ?1 AND v.aggregate_id = ?2 \
                                       ORDER BY v.sequence DESC LIMIT 1), 0) AS version, \
                            COALESCE((SELECT h.position FROM {{events}} h \
                                       ORDER BY h.position DESC LIMIT 1), 0) AS head) s \
               LEFT JOIN (SELECT {COLUMNS} FROM {{events}} e \
                           WHERE e.position IN ({matching})) x ON 1 \
              ORDER BY x.position"
        ));
        let (stream_type, stream_id) = match stream {
            Some((t, i)) => (Some(t.to_owned()), Some(i.to_owned())),
            None => (None, None),
        };
        let rows: Vec<SqliteRow> = params
            .bind(sqlx::query(&sql).bind(stream_type).bind(stream_id))
            .fetch_all(&self.inner.readers)
            .await
            .map_err(db("reading events by query"))?;
        let mut version = 0;
        let mut head = 0;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            version = row
                .try_get::<i64, _>("version")
                .map_err(db("reading events by query"))?;
            head = row
                .try_get::<i64, _>("head")
                .map_err(db("reading events by query"))?;
            let present: Option<i64> = row
                .try_get("position")
                .map_err(db("reading events by query"))?;
            if present.is_some() {
                events.push(decode_event(row, &self.inner.tables.events)?);
            }
        }
        let checkpoint = events
            .last()
            .map_or(Checkpoint::START, RecordedEvent::checkpoint);
        Ok(QueryRead {
            events,
            position: ReadPosition::read(checkpoint, Some(head.to_string())),
            stream_version: u64::try_from(version).unwrap_or(0),
        })
    }

    async fn tag_existing(&self, tags: &[(Checkpoint, Vec<String>)]) -> Result<u64, StoreError> {
        let mut rows: Vec<(String, i64)> = Vec::new();
        for (checkpoint, list) in tags {
            let list = crate::tags::normalized_tags(list.clone())
                .map_err(|reason| StoreError::InvalidQuery { reason })?;
            rows.extend(
                list.into_iter()
                    .map(|tag| (tag, to_i64(checkpoint.position))),
            );
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let mut tx = crate::port::events::Transactional::begin(self).await?;
        let mut added = 0;
        for chunk in rows.chunks(TAG_CHUNK) {
            let values = (0..chunk.len())
                .map(|i| format!("(?{}, ?{})", 2 * i + 1, 2 * i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = self.inner.tables.render(&format!(
                "INSERT OR IGNORE INTO {{tags}} (tag, position) \
                 SELECT v.column1, v.column2 FROM (VALUES {values}) v \
                  WHERE EXISTS (SELECT 1 FROM {{events}} e WHERE e.position = v.column2)"
            ));
            let mut query = sqlx::query(&sql);
            for (tag, position) in chunk {
                query = query.bind(tag.as_str()).bind(*position);
            }
            added += query
                .execute(&mut *tx)
                .await
                .map_err(db("tagging existing events"))?
                .rows_affected();
        }
        crate::port::events::Transactional::commit(self, tx).await?;
        Ok(added)
    }

    async fn append_tagged_in(
        &self,
        tx: &mut Self::Transaction,
        request: AppendRequest,
        tags: Vec<Vec<String>>,
        condition: Option<&AppendCondition>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        request.validate()?;
        if let Some(condition) = condition {
            condition.query.validate()?;
        }
        if request.events.is_empty() {
            return Ok(Vec::new());
        }
        let tags = event_tags(&request, tags)?;
        if let Some(condition) = condition {
            if self.condition_failed(tx, condition).await? {
                return Err(StoreError::ConditionFailed {
                    query: condition.query.to_string(),
                    after: condition.after.checkpoint(),
                });
            }
        }
        let written = self.append_on(tx, request).await?;
        self.insert_tags(tx, &written, &tags).await?;
        self.appended_in_transaction();
        Ok(written)
    }
}
