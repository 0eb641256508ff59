//! The log browser: events of a stream, after a position, of a type, or of
//! one correlation (a command and everything it caused), and a live tail
//! as server-sent events. The tail reads the log only as fast as the client
//! takes its events (back pressure: a slow client holds no buffer), and
//! like every reader it never skips a transaction that commits late.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::ApiError;
use super::auth::Role;
use super::Inner;
use crate::event::{Checkpoint, RecordedEvent};
use crate::port::log::{EventLog, LogFilter};
use crate::port::projections::ProjectionStore;

type Shared<S> = State<Arc<Inner<S>>>;

/// How many events a page holds at most.
const MAX_PAGE: usize = 1_000;

/// The browser's query.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Browse {
    /// `TYPE/ID`: one stream.
    stream: Option<String>,
    /// Only this aggregate type.
    #[serde(rename = "type")]
    aggregate_type: Option<String>,
    /// Events after this checkpoint (`TRANSACTION.POSITION`, as `next` gives).
    after: Option<String>,
    /// Events up to this checkpoint, inclusive (with `after`: a range of
    /// positions).
    to: Option<String>,
    /// One correlation.
    correlation: Option<uuid::Uuid>,
    /// At most this many (default 100, at most 1,000).
    limit: Option<usize>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_query", message)
}

/// `TRANSACTION.POSITION`, for `after`.
fn checkpoint_of(text: &str) -> Result<Checkpoint, ApiError> {
    checkpoint_named("after", text)
}

/// `TRANSACTION.POSITION`, for the query parameter `name`.
pub(crate) fn checkpoint_named(name: &str, text: &str) -> Result<Checkpoint, ApiError> {
    let (tx, position) = text
        .split_once('.')
        .ok_or_else(|| bad(format!("`{name}` is TRANSACTION.POSITION, not `{text}`")))?;
    match (tx.parse(), position.parse()) {
        (Ok(tx), Ok(position)) => Ok(Checkpoint::new(tx, position)),
        _ => Err(bad(format!(
            "`{name}` is TRANSACTION.POSITION, not `{text}`"
        ))),
    }
}

/// An event as the console shows it; payload and metadata only for those
/// who may read them.
pub(crate) fn event_json(event: &RecordedEvent, payloads: bool) -> Value {
    let mut value = json!({
        "position": event.position,
        "transaction_id": event.transaction_id,
        "checkpoint": format!("{}.{}", event.transaction_id, event.position),
        "aggregate_type": event.aggregate_type,
        "aggregate_id": event.aggregate_id,
        "sequence": event.sequence,
        "event_id": event.event_id,
        "event_type": event.event_type,
        "event_version": event.event_version,
        "recorded_at": event.recorded_at.to_rfc3339(),
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
    });
    if payloads {
        value["payload"] = event.payload.clone();
        value["metadata"] = json!(event.metadata);
    } else {
        value["payload_hidden"] = json!(true);
    }
    value
}

pub(crate) async fn browse<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
    Query(query): Query<Browse>,
) -> Result<Json<Value>, ApiError> {
    let who = inner.allow(&headers, Role::Reader)?;
    let payloads = who.role == Role::Operator || inner.payloads_for_readers;
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let stream = match &query.stream {
        Some(stream) => Some(
            stream
                .split_once('/')
                .filter(|(t, i)| !t.is_empty() && !i.is_empty())
                .ok_or_else(|| bad("`stream` is TYPE/ID, for example account/a-1"))?,
        ),
        None => None,
    };
    if let (Some((aggregate_type, aggregate_id)), Some(store)) = (stream, &inner.events) {
        let after: u64 = match &query.after {
            Some(text) => text
                .parse()
                .map_err(|_| bad("`after` in a stream is a sequence"))?,
            None => 0,
        };
        let events = store
            .read_stream(aggregate_type, aggregate_id, after, limit)
            .await?;
        let next = events.last().map(|e| e.sequence.to_string());
        return Ok(Json(json!({
            "events": events.iter().map(|e| event_json(e, payloads)).collect::<Vec<_>>(),
            "next": next,
        })));
    }
    let filter = match (stream, &query.aggregate_type) {
        (Some((aggregate_type, _)), _) => LogFilter::aggregate_types([aggregate_type]),
        (None, Some(aggregate_type)) => LogFilter::aggregate_types([aggregate_type.as_str()]),
        (None, None) => LogFilter::all(),
    };
    let log = inner.runner.log();
    let parts = log.partitions().max(1);
    let mut after = match &query.after {
        Some(text) => checkpoint_of(text)?,
        None => Checkpoint::START,
    };
    let to = match &query.to {
        Some(text) => Some(checkpoint_named("to", text)?),
        None => None,
    };
    let mut found = Vec::new();
    // Reads until a page is full, or the log's end; a filter that matches
    // few events reads at most a bounded number of windows per request.
    let mut windows = 0;
    let filters: Vec<LogFilter> = if parts == 1 {
        vec![filter]
    } else {
        (0..parts)
            .map(|p| filter.clone().with_partition(p, parts))
            .collect()
    };
    'reading: for filter in &filters {
        let mut from = after;
        loop {
            let events = log.read_log(from, filter, 500).await?;
            windows += 1;
            let Some(last) = events.last() else { break };
            from = last.checkpoint();
            let past_end = to.is_some_and(|to| from > to);
            for event in events {
                if to.is_some_and(|to| event.checkpoint() > to) {
                    break;
                }
                let wanted = stream.is_none_or(|(_, id)| event.aggregate_id == id)
                    && query
                        .correlation
                        .is_none_or(|c| event.correlation_id == Some(c));
                if wanted {
                    let checkpoint = event.checkpoint();
                    found.push(event);
                    if found.len() >= limit {
                        // The next page starts after the last event shown.
                        after = checkpoint;
                        break 'reading;
                    }
                }
            }
            if past_end {
                // The range ends in this window: nothing after it is wanted.
                from = to.unwrap_or(from);
                break;
            }
            if windows >= 200 {
                after = from;
                break 'reading;
            }
        }
        after = from;
    }
    let ended = to.is_some_and(|to| after >= to);
    let next = (!ended && (found.len() >= limit || windows >= 200))
        .then(|| format!("{}.{}", after.transaction_id, after.position));
    Ok(Json(json!({
        "events": found.iter().map(|e| event_json(e, payloads)).collect::<Vec<_>>(),
        "next": next,
    })))
}

/// The live tail: `event` for each event from the head on (or after
/// `after`), in log order.
pub(crate) async fn tail<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
    Query(query): Query<Browse>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let who = inner.allow(&headers, Role::Reader)?;
    let payloads = who.role == Role::Operator || inner.payloads_for_readers;
    let log = inner.runner.log().clone();
    if log.partitions() > 1 {
        return Err(bad(
            "a partitioned log has no single order to tail: browse each partition",
        ));
    }
    let start = match &query.after {
        Some(text) => checkpoint_of(text)?,
        None => log.head().await?,
    };
    let filter = match &query.aggregate_type {
        Some(t) => LogFilter::aggregate_types([t.as_str()]),
        None => LogFilter::all(),
    };
    let wakeups = log.wakeups();
    let state = (log, filter, start, wakeups, Vec::<RecordedEvent>::new());
    let stream = futures::stream::unfold(
        state,
        move |(log, filter, mut after, mut wakeups, mut pending)| async move {
            loop {
                if !pending.is_empty() {
                    let event = pending.remove(0);
                    let data = event_json(&event, payloads).to_string();
                    let sse = Event::default().event("event").data(data);
                    return Some((Ok(sse), (log, filter, after, wakeups, pending)));
                }
                match log.read_log(after, &filter, 100).await {
                    Ok(events) if !events.is_empty() => {
                        if let Some(last) = events.last() {
                            after = last.checkpoint();
                        }
                        pending = events;
                    }
                    Ok(_) => {
                        wakeups.wait().await;
                    }
                    Err(error) => {
                        let sse = Event::default()
                            .event("error")
                            .data(crate::error::error_chain(&error));
                        wakeups.wait().await;
                        return Some((Ok(sse), (log, filter, after, wakeups, pending)));
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
