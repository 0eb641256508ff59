//! The console's timers: counts, pending and refused timers by key and due
//! time, and an operator's retry or cancel of one.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

use super::api::ApiError;
use super::auth::Role;
use super::Inner;
use crate::error::StoreError;
use crate::port::projections::ProjectionStore;
use crate::timer::{TimerQuery, TimerRecord, TimerState, TimerStatus, TimerStore, Timers};

type Shared<S> = State<Arc<Inner<S>>>;

/// What the console does with a [`Timers`], whatever its store.
#[async_trait]
pub(crate) trait TimerOps: Send + Sync {
    async fn status(&self) -> Result<TimerStatus, StoreError>;
    async fn list(&self, query: &TimerQuery) -> Result<Vec<TimerRecord>, StoreError>;
    async fn retry(&self, key: &str) -> Result<bool, StoreError>;
    async fn cancel(&self, key: &str) -> Result<bool, StoreError>;
}

#[async_trait]
impl<T: TimerStore> TimerOps for Timers<T> {
    async fn status(&self) -> Result<TimerStatus, StoreError> {
        Timers::status(self).await
    }

    async fn list(&self, query: &TimerQuery) -> Result<Vec<TimerRecord>, StoreError> {
        Timers::list(self, query).await
    }

    async fn retry(&self, key: &str) -> Result<bool, StoreError> {
        Timers::retry(self, key).await
    }

    async fn cancel(&self, key: &str) -> Result<bool, StoreError> {
        Timers::cancel_alone(self, key).await
    }
}

/// `?state=pending|fired|refused|cancelled|failed&prefix=…&limit=…`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ListQuery {
    state: Option<String>,
    prefix: Option<String>,
    limit: Option<usize>,
}

/// `?key=…` (keys may hold slashes).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct KeyQuery {
    key: Option<String>,
}

fn ops<S: ProjectionStore>(inner: &Inner<S>) -> Result<&Arc<dyn TimerOps>, ApiError> {
    inner.timers.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_timers",
            "this console was not given timers (Admin::timers)",
        )
    })
}

fn record_json(timer: &TimerRecord) -> Value {
    json!({
        "key": timer.key,
        "target": timer.target,
        "target_id": timer.target_id,
        "due_at": timer.due_at.to_rfc3339(),
        "state": timer.state,
        "attempts": timer.attempts,
        "last_error": timer.last_error,
        "command_id": timer.command_id,
        "correlation_id": timer.correlation_id,
        "scheduled_at": timer.scheduled_at.to_rfc3339(),
        "finished_at": timer.finished_at.map(|t| t.to_rfc3339()),
    })
}

/// The counts and one page of timers (pending by default, earliest due
/// first).
pub(crate) async fn list<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    inner.allow(&headers, Role::Reader)?;
    let ops = ops(&inner)?;
    let state = match query.state.as_deref() {
        None | Some("") => Some(TimerState::Pending),
        Some("all") => None,
        Some(name) => Some(TimerState::parse(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!(
                    "unknown timer state `{}`: pending, fired, refused, cancelled, failed or all",
                    name.chars().take(64).collect::<String>()
                ),
            )
        })?),
    };
    let status = ops.status().await?;
    let timers = ops
        .list(&TimerQuery {
            state,
            key_prefix: query.prefix.filter(|p| !p.is_empty()),
            limit: query.limit.unwrap_or(100).clamp(1, 1000),
        })
        .await?;
    let counts = &status.counts;
    Ok(Json(json!({
        "table": status.table,
        "scheduler": status.scheduler,
        "last_error": status.last_error,
        "counts": {
            "pending": counts.pending,
            "overdue": counts.overdue,
            "late": counts.late,
            "oldest_overdue_seconds": counts.oldest_overdue.map(|d| d.as_secs_f64()),
            "next_due": counts.next_due.map(|t| t.to_rfc3339()),
            "fired": counts.fired,
            "refused": counts.refused,
            "cancelled": counts.cancelled,
            "failed": counts.failed,
        },
        "timers": timers.iter().map(record_json).collect::<Vec<_>>(),
    })))
}

fn key_of(query: KeyQuery) -> Result<String, ApiError> {
    match query.key {
        Some(key) if !key.is_empty() && key.len() <= crate::timer::MAX_TIMER_KEY_LEN => Ok(key),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "`key` is required (at most 512 bytes)",
        )),
    }
}

/// An operator's action on one timer: `act` says whether there was a
/// timer to act on; `missing` says which there was not.
async fn act_on<S: ProjectionStore>(
    inner: &Inner<S>,
    headers: &HeaderMap,
    query: KeyQuery,
    (action, state, missing): (&str, &str, &'static str),
    act: impl for<'a> FnOnce(
        &'a dyn TimerOps,
        &'a str,
    ) -> futures::future::BoxFuture<'a, Result<bool, StoreError>>,
) -> Result<Json<Value>, ApiError> {
    let who = inner.allow(headers, Role::Operator)?;
    let key = key_of(query)?;
    if !act(ops(inner)?.as_ref(), &key).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_timer",
            missing,
        ));
    }
    tracing::info!(target: "outflow::admin", who = %who.name, action, key = %key, "console action");
    Ok(Json(json!({ "key": key, "state": state })))
}

/// Fires a refused or failed timer again, now.
pub(crate) async fn retry<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
    Query(query): Query<KeyQuery>,
) -> Result<Json<Value>, ApiError> {
    let what = (
        "retry timer",
        "pending",
        "no refused or failed timer has this key",
    );
    act_on(&inner, &headers, query, what, |ops, key| ops.retry(key)).await
}

/// Cancels a pending timer.
pub(crate) async fn cancel<S: ProjectionStore>(
    State(inner): Shared<S>,
    headers: HeaderMap,
    Query(query): Query<KeyQuery>,
) -> Result<Json<Value>, ApiError> {
    let what = ("cancel timer", "cancelled", "no pending timer has this key");
    act_on(&inner, &headers, query, what, |ops, key| ops.cancel(key)).await
}
