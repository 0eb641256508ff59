//! The projections' public status, the page, the live feed and `/metrics`.
//! Operators use the framework's console at `/admin` (see `http.rs`).

use std::convert::Infallible;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use futures::Stream;
use outflow::pubsub::RecvError;
use serde_json::{json, Value};

use crate::app::AppStore;

use super::errors::*;
use super::state::*;

pub(super) async fn projections<S: AppStore>(
    State(state): Shared<S>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let statuses = state.app.runner.status().await?;
    Ok(Json(
        statuses
            .into_iter()
            .map(|s| {
                json!({
                    "projection": s.projection,
                    "partition": s.partition,
                    "state": s.state.to_string(),
                    "position": s.checkpoint.position,
                    "lag_events": s.lag_events,
                    "processed": s.processed,
                    "parked": s.parked,
                    "paused": s.paused,
                    "last_error": s.last_error,
                    "error_kind": s.error_kind.map(|k| k.as_str()),
                    "log_error": s.log_error,
                    "held_back_by": s.held_back_by.map(|h| json!({
                        "pid": h.pid,
                        "state": h.state,
                        "age_ms": h.age.as_millis() as u64,
                        "query": h.query,
                    })),
                    "rebuild": s.rebuild.map(|r| json!({ "done": r.done, "total": r.total })),
                })
            })
            .collect(),
    ))
}

pub(super) async fn page() -> Html<&'static str> {
    Html(PAGE)
}

pub(super) async fn metrics<S: AppStore>(State(state): Shared<S>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::not_found("metrics are not recorded in this process").into_response(),
    }
}

/// The live feed: every event this process commits, as server-sent events,
/// at most once. A subscriber that falls behind gets a `lagged` event with
/// how many it missed.
pub(super) async fn events<S: AppStore>(
    State(state): Shared<S>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let subscription = state.app.feed.subscribe();
    let stream = futures::stream::unfold(subscription, |mut subscription| async move {
        let event = match subscription.recv().await {
            Ok(event) => Event::default().event("committed").data(
                json!({
                    "position": event.position,
                    "aggregate_type": event.aggregate_type,
                    "aggregate_id": event.aggregate_id,
                    "event_type": event.event_type,
                    "payload": event.payload,
                })
                .to_string(),
            ),
            Err(RecvError::Lagged(missed)) => Event::default()
                .event("lagged")
                .data(json!({ "missed": missed }).to_string()),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), subscription))
    });
    let stopped = state.shutdown.clone().cancelled_owned();
    Sse::new(futures::StreamExt::take_until(stream, stopped)).keep_alive(KeepAlive::default())
}
