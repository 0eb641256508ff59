//! The HTTP API, the live page and `/metrics` (see `docs/src/example.md`
//! for the routes). Commands are `POST`s with JSON bodies; queries are
//! `GET`s that read the projections, eventually consistent unless asked
//! for `?consistency=strong`. Every error is JSON with a 4xx status when the
//! client caused it.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument;

use crate::app::AppStore;

mod admin;
mod commands;
mod errors;
mod extract;
mod queries;
mod state;

use admin::*;
use commands::*;
use queries::*;

pub use errors::ApiError;
pub use extract::{Body, Params, PathParam};
pub use state::{ApiState, MAX_BODY, MAX_ID};

/// The routes, on `state`.
pub fn router<S: AppStore>(state: ApiState<S>) -> Router {
    // The operators' console (`/admin`), from the framework: the same token.
    let console = outflow::admin::Admin::new(state.app.runner.clone())
        .operator_token(state.admin_token.clone().unwrap_or_default())
        .events(state.app.store.clone())
        .timers(state.app.timers.clone())
        .router();
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics::<S>))
        .route("/api/users", post(sign_up::<S>).get(list_users::<S>))
        .route("/api/users/{id}", axum::routing::delete(forget_user::<S>))
        .route(
            "/api/accounts",
            post(open_account::<S>).get(list_accounts::<S>),
        )
        .route("/api/accounts/{id}", get(get_account::<S>))
        .route("/api/accounts/{id}/statement", get(get_statement::<S>))
        .route("/api/accounts/{id}/deposits", post(deposit::<S>))
        .route("/api/accounts/{id}/withdrawals", post(withdraw::<S>))
        .route("/api/accounts/{id}/close", post(close::<S>))
        .route(
            "/api/transfers",
            post(transfer::<S>).get(list_transfers::<S>),
        )
        .route("/api/transfers/{id}", get(get_transfer::<S>))
        .route("/api/emails", get(list_emails::<S>))
        .route("/api/projections", get(projections::<S>))
        .route("/api/events", get(events::<S>))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(state))
        .nest("/admin", console)
        .layer(axum::middleware::from_fn(trace_request))
}

/// One span per request, continuing the caller's trace when it sends a
/// W3C `traceparent` header: the commands the request runs are its
/// children, and their events carry the trace on (see `outflow::trace`).
async fn trace_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let span = tracing::info_span!(
        "http.request",
        method = %request.method(),
        path = %request.uri().path(),
        status = tracing::field::Empty,
    );
    let context: std::collections::BTreeMap<String, String> =
        [outflow::trace::TRACEPARENT, outflow::trace::TRACESTATE]
            .into_iter()
            .filter_map(|name| {
                let value = request.headers().get(name)?.to_str().ok()?;
                Some((name.to_owned(), value.to_owned()))
            })
            .collect();
    outflow::trace::follow_carrier(&span, &context);
    let response = next.run(request).instrument(span.clone()).await;
    span.record("status", response.status().as_u16());
    response
}
