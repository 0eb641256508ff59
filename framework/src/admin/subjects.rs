//! The console's erasure: an operator forgets a data subject.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

use super::api::ApiError;
use super::auth::Role;
use super::Inner;
use crate::port::projections::ProjectionStore;

/// The longest subject id the console takes.
const MAX_SUBJECT: usize = 512;

/// `?subject=…` (ids may hold slashes).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct SubjectQuery {
    subject: Option<String>,
}

/// Forgets a subject: `{"subject": …, "forgotten": true}`, or `false` when
/// it was forgotten before (nothing changes then).
pub(crate) async fn forget<S: ProjectionStore>(
    State(inner): State<Arc<Inner<S>>>,
    headers: HeaderMap,
    Query(query): Query<SubjectQuery>,
) -> Result<Json<Value>, ApiError> {
    let who = inner.allow(&headers, Role::Operator)?;
    let Some(keys) = &inner.keys else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_keys",
            "this console was given no key ring (Admin::keys, or Admin::events with a store that has one)",
        ));
    };
    let subject = match query.subject {
        Some(subject)
            if !subject.is_empty() && subject.len() <= MAX_SUBJECT && !subject.contains('\0') =>
        {
            subject
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "`subject` is required (1 to 512 bytes, no NUL)",
            ))
        }
    };
    let forgotten = keys.forget(&subject).await?;
    tracing::info!(target: "outflow::admin", who = %who.name, action = "forget subject",
        subject = %subject, newly = forgotten, "console action");
    Ok(Json(json!({ "subject": subject, "forgotten": forgotten })))
}
