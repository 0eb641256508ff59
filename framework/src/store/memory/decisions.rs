//! Tags, reads by query and conditional appends in memory. A transaction's
//! append fails at commit when anything was appended since it began, so a
//! condition checked at append time still holds at commit.

use async_trait::async_trait;

use super::state::*;
use crate::error::StoreError;
use crate::event::{AppendRequest, Checkpoint, RecordedEvent};
use crate::port::decisions::{
    event_tags, AppendCondition, ConditionalAppend, QueryRead, ReadPosition,
};
use crate::port::events::AppendInTransaction;
use crate::tags::Query;

impl State {
    fn matches(&self, query: &Query, event: &RecordedEvent) -> bool {
        let none = Vec::new();
        let tags = self.tags.get(&event.event_id).unwrap_or(&none);
        query.matches(&event.event_type, tags)
    }

    /// Whether `event` passes `filter`, its query judged on the event's
    /// tags.
    pub(super) fn passes(
        &self,
        filter: &crate::port::log::LogFilter,
        event: &RecordedEvent,
    ) -> bool {
        filter.matches(event) && filter.query().is_none_or(|q| self.matches(q, event))
    }
}

#[async_trait]
impl ConditionalAppend for MemoryStore {
    async fn read_query(
        &self,
        query: &Query,
        stream: Option<(&str, &str)>,
    ) -> Result<QueryRead, StoreError> {
        query.validate()?;
        let state = self.state();
        let events: Vec<RecordedEvent> = state
            .log
            .iter()
            .filter(|e| state.matches(query, e))
            .cloned()
            .collect();
        let stream_version = stream.map_or(0, |(t, i)| {
            state
                .streams
                .get(&(t.to_owned(), i.to_owned()))
                .map_or(0, |s| s.len() as u64)
        });
        let checkpoint = events
            .last()
            .map_or(Checkpoint::START, RecordedEvent::checkpoint);
        Ok(QueryRead {
            events,
            position: ReadPosition::read(checkpoint, None),
            stream_version,
        })
    }

    async fn tag_existing(&self, tags: &[(Checkpoint, Vec<String>)]) -> Result<u64, StoreError> {
        let mut lists = Vec::with_capacity(tags.len());
        for (checkpoint, list) in tags {
            let list = crate::tags::normalized_tags(list.clone())
                .map_err(|reason| StoreError::InvalidQuery { reason })?;
            lists.push((*checkpoint, list));
        }
        let mut state = self.state();
        let mut added = 0;
        for (checkpoint, list) in lists {
            let Some(event_id) = state
                .log
                .iter()
                .find(|e| e.checkpoint() == checkpoint)
                .map(|e| e.event_id)
            else {
                continue;
            };
            let known = state.tags.entry(event_id).or_default();
            for tag in list {
                if !known.contains(&tag) {
                    known.push(tag);
                    added += 1;
                }
            }
        }
        Ok(added)
    }

    async fn append_tagged_in(
        &self,
        tx: &mut MemoryTransaction,
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
            let state = self.state();
            let after = condition.after.checkpoint().position;
            if state
                .log
                .iter()
                .any(|e| e.position > after && state.matches(&condition.query, e))
            {
                return Err(StoreError::ConditionFailed {
                    query: condition.query.to_string(),
                    after: condition.after.checkpoint(),
                });
            }
        }
        let written = self.append_in(tx, request).await?;
        let mut state = self.state();
        for (event, list) in written.iter().zip(tags) {
            state.tags.insert(event.event_id, list);
        }
        Ok(written)
    }
}
