//! The operator endpoints (a bearer token), and the page, the live feed
//! and `/metrics`.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use futures::Stream;
use outflow::pubsub::RecvError;
use outflow::runner::RetryError;
use serde_json::{json, Value};

use crate::app::{self, AppStore};

use super::errors::*;
use super::extract::*;
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

pub(super) async fn dead_letters<S: AppStore>(
    State(state): Shared<S>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let mut out = Vec::new();
    for (name, letter) in state.app.dead_letters().await? {
        out.push(json!({
            "id": letter.id,
            "projection": name,
            "aggregate_type": letter.event.aggregate_type,
            "aggregate_id": letter.event.aggregate_id,
            "event_type": letter.event.event_type,
            "position": letter.checkpoint.position,
            "error": letter.error,
            "attempts": letter.attempts,
        }));
    }
    Ok(Json(out))
}

// ---------------------------------------------------------------- operators

/// The operator endpoints need the configured bearer token; without one
/// configured they are disabled.
pub(super) fn authorize<S: AppStore>(
    state: &ApiState<S>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "disabled",
            "operator endpoints are disabled: set OUTFLOW_ADMIN_TOKEN on the server",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an `Authorization: Bearer <token>` header is required",
        )),
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is not the operators' token",
        )),
    }
}

/// Compares without stopping at the first difference.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A dead letter's id from the path, after authorization.
pub(super) fn dead_letter_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a dead letter's id is a whole number",
        )
    })
}

pub(super) fn known_projection(name: &str) -> Result<(), ApiError> {
    if app::PROJECTIONS.contains(&name) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no projection {name}")))
    }
}

pub(super) async fn rebuild<S: AppStore>(
    State(state): Shared<S>,
    headers: HeaderMap,
    PathParam(name): PathParam,
) -> Result<impl IntoResponse, ApiError> {
    authorize(&state, &headers)?;
    known_projection(&name)?;
    let progress = state.app.runner.rebuild(&name).await?;
    let total = progress.borrow().total;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "projection": name, "total": total })),
    ))
}

pub(super) async fn pause<S: AppStore>(
    State(state): Shared<S>,
    headers: HeaderMap,
    PathParam(name): PathParam,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    known_projection(&name)?;
    state.app.runner.pause(&name).await?;
    Ok(Json(json!({ "projection": name, "paused": true })))
}

pub(super) async fn resume<S: AppStore>(
    State(state): Shared<S>,
    headers: HeaderMap,
    PathParam(name): PathParam,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    known_projection(&name)?;
    state.app.runner.resume(&name).await?;
    Ok(Json(json!({ "projection": name, "paused": false })))
}

pub(super) async fn retry<S: AppStore>(
    State(state): Shared<S>,
    headers: HeaderMap,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let id = dead_letter_id(&id)?;
    match state.app.retry_dead_letter(id).await {
        Ok(Some(name)) => Ok(Json(
            json!({ "id": id, "projection": name, "retried": true }),
        )),
        Ok(None) => Err(ApiError::not_found(format!("no dead letter {id}"))),
        Err(RetryError::Handler(error)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "still_failing",
            outflow::error::error_chain(error.source()),
        )),
        Err(RetryError::Store(error)) => Err(error.into()),
        Err(other) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            other.to_string(),
        )),
    }
}

pub(super) async fn discard<S: AppStore>(
    State(state): Shared<S>,
    headers: HeaderMap,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let id = dead_letter_id(&id)?;
    if state.app.runner.discard_dead_letter(id).await? {
        Ok(Json(json!({ "id": id, "discarded": true })))
    } else {
        Err(ApiError::not_found(format!("no dead letter {id}")))
    }
}

// ---------------------------------------------------------------- page, feed, metrics

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
