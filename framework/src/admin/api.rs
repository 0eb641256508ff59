//! The console's JSON API: status, the plots' figures, dead letters, and
//! the operators' actions, each logged with who did it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde_json::{json, Value};

use super::auth::Role;
use super::Inner;
use crate::error::{ConfigError, StoreError};
use crate::port::projections::ProjectionStore;
use crate::runner::{ProjectionStatus, RetryError};

type Shared<S> = State<Arc<Inner<S>>>;

/// An error as the API answers it: a status and `{"error", "message"}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    error: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.error, "message": self.message})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::Config(ConfigError::UnknownProjection(name)) => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_projection",
                format!("no projection `{name}` in this runner"),
            ),
            StoreError::Config(ConfigError::Invalid { reason, .. }) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", reason.clone())
            }
            _ => {
                tracing::warn!(target: "outflow::admin", error = %crate::error::error_chain(&error), "a console request failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store",
                    crate::error::error_chain(&error),
                )
            }
        }
    }
}

/// A dead letter's id from the path: digits only.
fn id_of(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_id",
            format!("`{text}` is not a dead letter's id"),
        )
    })
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The page: plain HTML and script, served from the crate.
pub(crate) async fn page<S: ProjectionStore>(
    State(inner): Shared<S>,
) -> Result<Html<&'static str>, ApiError> {
    if inner.tokens.is_empty() && inner.authorizer.is_none() {
        return Err(inner
            .allow(&HeaderMap::new(), Role::Reader)
            .err()
            .unwrap_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "disabled", "off")));
    }
    Ok(Html(include_str!("page.html")))
}

pub(crate) async fn whoami<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let principal = inner.allow(&headers, Role::Reader)?;
    Ok(Json(principal.json()))
}

fn unit_json(s: &ProjectionStatus) -> Value {
    json!({
        "projection": s.projection,
        "partition": s.partition,
        "partitions": s.partitions,
        "state": s.state.to_string(),
        "paused": s.paused,
        "position": s.checkpoint.position,
        "checkpoint": format!("{}.{}", s.checkpoint.transaction_id, s.checkpoint.position),
        "owner": s.owner,
        "epoch": s.epoch,
        "lag_events": s.lag_events,
        "lag_ms": s.lag.as_millis() as u64,
        "processed": s.processed,
        "parked": s.parked,
        "last_error": s.last_error,
        "error_kind": s.error_kind.map(|k| k.as_str()),
        "log_error": s.log_error,
        "rebuild": s.rebuild.map(|r| json!({"done": r.done, "total": r.total})),
        "held_back_by": s.held_back_by.as_ref().map(|h| json!({
            "pid": h.pid,
            "state": h.state,
            "age_ms": h.age.as_millis() as u64,
            "query": h.query,
        })),
    })
}

pub(crate) async fn status<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    inner.allow(&headers, Role::Reader)?;
    let units = inner.runner.status().await?;
    let mut nodes: Vec<Value> = Vec::new();
    for unit in &units {
        if let Some(owner) = &unit.owner {
            match nodes.iter_mut().find(|n| n["node"] == json!(owner)) {
                Some(node) => {
                    if let Some(held) = node["units"].as_array_mut() {
                        held.push(json!(format!("{}/{}", unit.projection, unit.partition)));
                    }
                }
                None => nodes.push(json!({
                    "node": owner,
                    "units": [format!("{}/{}", unit.projection, unit.partition)],
                })),
            }
        }
    }
    Ok(Json(json!({
        "node": inner.runner.node_id(),
        "nodes": nodes,
        "units": units.iter().map(unit_json).collect::<Vec<_>>(),
    })))
}

pub(crate) async fn samples<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    inner.allow(&headers, Role::Reader)?;
    Ok(Json(inner.samples.json()))
}

pub(crate) async fn activity<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    inner.allow(&headers, Role::Reader)?;
    Ok(Json(json!({
        "outbox": inner.outbox.as_ref().map(|outbox| outbox.table.clone()),
        "samples": inner.samples.activity_json(),
    })))
}

/// The JetStream partitions and their leaders, when the console has the
/// store (`{"partitions": null}` otherwise).
pub(crate) async fn partitions<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    inner.allow(&headers, Role::Reader)?;
    #[cfg(feature = "nats")]
    if let Some(store) = &inner.jetstream {
        let partitions = store.partitions_info().await?;
        return Ok(Json(json!({ "partitions": partitions })));
    }
    Ok(Json(json!({ "partitions": null })))
}

pub(crate) async fn dead_letters<S: ProjectionStore>(
    State(inner): Shared<S>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    inner.allow(&headers, Role::Reader)?;
    let letters = inner.runner.dead_letters(&name).await?;
    Ok(Json(Value::Array(
        letters
            .iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "partition": d.unit.partition,
                    "event_id": d.event_id,
                    "position": d.checkpoint.position,
                    "aggregate_type": d.event.aggregate_type,
                    "aggregate_id": d.event.aggregate_id,
                    "sequence": d.event.sequence,
                    "event_type": d.event.event_type,
                    "error": d.error,
                    "attempts": d.attempts,
                    "first_failed_at": d.first_failed_at.to_rfc3339(),
                    "last_failed_at": d.last_failed_at.to_rfc3339(),
                })
            })
            .collect(),
    )))
}

/// Logs an action with who did it.
fn logged(who: &super::Principal, action: &str, projection: &str, detail: &str) {
    tracing::info!(target: "outflow::admin", who = %who.name, action, projection, detail, "console action");
}

pub(crate) async fn rebuild<S: ProjectionStore>(
    State(inner): Shared<S>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = inner.allow(&headers, Role::Operator)?;
    let progress = inner.runner.rebuild(&name).await?;
    let total = progress.borrow().total;
    logged(&who, "rebuild", &name, &format!("{total} events to replay"));
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"projection": name, "total": total})),
    ))
}

/// Server-sent events of a rebuild's progress (`progress`, then `done`),
/// read from the units' records (events replayed of those counted when the
/// last rebuild started), so any node's rebuild shows.
pub(crate) async fn rebuild_progress<S: ProjectionStore>(
    State(inner): Shared<S>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    inner.allow(&headers, Role::Reader)?;
    if !inner
        .runner
        .status()
        .await?
        .iter()
        .any(|u| u.projection == name)
    {
        return Err(StoreError::from(ConfigError::UnknownProjection(name)).into());
    }
    let stream = futures::stream::unfold(Some((inner, name, None)), |state| async move {
        let (inner, name, last) = state?;
        loop {
            let units = match inner.runner.store().units(Some(&name)).await {
                Ok(units) => units,
                Err(error) => {
                    let event = Event::default()
                        .event("error")
                        .data(crate::error::error_chain(&error));
                    return Some((Ok(event), None));
                }
            };
            let total: u64 = units.iter().filter_map(|u| u.rebuild_total).sum();
            let done: u64 = units
                .iter()
                .filter_map(|u| u.rebuild_total.map(|t| u.processed.min(t)))
                .sum();
            let complete = done >= total;
            let now = Some((done, total));
            if complete {
                let event = Event::default()
                    .event("done")
                    .data(json!({"done": done, "total": total}).to_string());
                return Some((Ok(event), None));
            }
            if now != last {
                let event = Event::default()
                    .event("progress")
                    .data(json!({"done": done, "total": total}).to_string());
                return Some((Ok(event), Some((inner, name, now))));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

macro_rules! simple_action {
    ($fn:ident, $method:ident, $what:literal) => {
        pub(crate) async fn $fn<S: ProjectionStore>(
            State(inner): Shared<S>,
            Path(name): Path<String>,
            headers: HeaderMap,
        ) -> Result<Json<Value>, ApiError> {
            let who = inner.allow(&headers, Role::Operator)?;
            inner.runner.$method(&name).await?;
            logged(&who, $what, &name, "");
            Ok(Json(json!({"projection": name, "done": $what})))
        }
    };
}

/// `?to=TRANSACTION.POSITION` of a reset.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ResetQuery {
    to: Option<String>,
}

/// Moves a projection to a checkpoint (`?to=`), its read model kept.
pub(crate) async fn reset<S: ProjectionStore>(
    State(inner): Shared<S>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(query): Query<ResetQuery>,
) -> Result<Json<Value>, ApiError> {
    let who = inner.allow(&headers, Role::Operator)?;
    let Some(to) = &query.to else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "`to` is required: TRANSACTION.POSITION (0.0 for the start)",
        ));
    };
    let to = super::events::checkpoint_named("to", to)?;
    let left = inner.runner.reset_to(&name, to).await?;
    let to = format!("{}.{}", to.transaction_id, to.position);
    logged(&who, "reset", &name, &format!("to {to}"));
    Ok(Json(json!({"projection": name, "to": to, "events": left})))
}

simple_action!(pause, pause, "pause");
simple_action!(resume, resume, "resume");
simple_action!(restart, restart, "restart");

fn retry_error(error: RetryError) -> ApiError {
    match error {
        RetryError::NotFound { projection, id } => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_dead_letter",
            format!("no dead letter {id} for `{projection}`"),
        ),
        RetryError::Handler(error) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "failed_again",
            error.chain(),
        ),
        RetryError::Store(error) => error.into(),
    }
}

pub(crate) async fn retry<S: ProjectionStore>(
    State(inner): Shared<S>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = inner.allow(&headers, Role::Operator)?;
    let id = id_of(&id)?;
    let result = inner.runner.retry_dead_letter(&name, id).await;
    logged(
        &who,
        "retry",
        &name,
        &format!(
            "dead letter {id}: {}",
            if result.is_ok() {
                "handled"
            } else {
                "not handled"
            }
        ),
    );
    result.map_err(retry_error)?;
    Ok(Json(json!({"projection": name, "id": id, "handled": true})))
}

pub(crate) async fn discard<S: ProjectionStore>(
    State(inner): Shared<S>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = inner.allow(&headers, Role::Operator)?;
    let id = id_of(&id)?;
    let letters = inner.runner.dead_letters(&name).await?;
    if !letters.iter().any(|d| d.id == id) {
        return Err(retry_error(RetryError::NotFound {
            projection: name,
            id,
        }));
    }
    inner.runner.discard_dead_letter(id).await?;
    logged(&who, "discard", &name, &format!("dead letter {id}"));
    Ok(Json(
        json!({"projection": name, "id": id, "discarded": true}),
    ))
}

pub(crate) async fn retry_all<S: ProjectionStore>(
    State(inner): Shared<S>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = inner.allow(&headers, Role::Operator)?;
    let (handled, failed) = inner.runner.retry_dead_letters(&name).await?;
    logged(
        &who,
        "retry all",
        &name,
        &format!("{handled} handled, {} failed again", failed.len()),
    );
    Ok(Json(json!({
        "projection": name,
        "handled": handled,
        "failed": failed.iter().map(|(id, e)| json!({"id": id, "error": e.to_string()})).collect::<Vec<_>>(),
    })))
}

pub(crate) async fn discard_all<S: ProjectionStore>(
    State(inner): Shared<S>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = inner.allow(&headers, Role::Operator)?;
    let letters = inner.runner.dead_letters(&name).await?;
    let mut discarded = 0;
    for letter in &letters {
        if inner.runner.discard_dead_letter(letter.id).await? {
            discarded += 1;
        }
    }
    logged(
        &who,
        "discard all",
        &name,
        &format!("{discarded} dead letters"),
    );
    Ok(Json(json!({"projection": name, "discarded": discarded})))
}
