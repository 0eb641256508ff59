//! Extractors that turn every problem of a request (not JSON, a missing
//! field, an id too long) into a 400 or 422 with a JSON error.

use axum::extract::{FromRequest, Path, Query, Request};
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;

use super::errors::*;
use super::state::*;

/// A JSON body whose every problem (not JSON, a missing field, a wrong
/// type) is a 400 with a JSON error.
pub struct Body<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(body)) => Ok(Body(body)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("a request body is at most {MAX_BODY} bytes"),
                ))
            }
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                rejection.body_text(),
            )),
        }
    }
}

/// Query parameters whose every problem (a repeated or unknown value of
/// the wrong type) is a 400 with a JSON error.
pub struct Params<T>(pub(super) T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(params)) => Ok(Params(params)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                rejection.body_text(),
            )),
        }
    }
}

/// The one path parameter of a route, as text; a path that does not
/// decode is a 400 with a JSON error. Checked by the handler (after
/// authorization, for the operators' routes).
pub struct PathParam(pub(super) String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParam(value)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                rejection.body_text(),
            )),
        }
    }
}

/// A name (a user's, an owner's) at most [`MAX_NAME`](crate::MAX_NAME)
/// characters long, else a 422 naming the field (the domain checks the rest).
pub(super) fn check_length(field: &str, name: &str) -> Result<(), ApiError> {
    if name.trim().chars().count() > crate::MAX_NAME {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "refused",
            format!("the {field} is longer than {} characters", crate::MAX_NAME),
        ));
    }
    Ok(())
}

/// An account's or a transfer's id: 1 to [`MAX_ID`] letters, digits, `-`
/// or `_` (the ids the server gives out), else a 400 naming the field.
pub(super) fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the {field} is 1 to {MAX_ID} letters, digits, `-` or `_`"),
        ))
    }
}

/// The operators' token in `Authorization: Bearer …`, compared in constant
/// time; a 401 without it, a 403 with another, a 404 when the server has
/// no token (operators' routes are off, as the console is).
pub(super) fn check_operator<S: crate::app::AppStore>(
    state: &super::state::ApiState<S>,
    headers: &axum::http::HeaderMap,
) -> Result<(), ApiError> {
    let Some(token) = &state.admin_token else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "operators' routes are off (no OUTFLOW_ADMIN_TOKEN)",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(given) = given else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an operator's token is required (Authorization: Bearer …)",
        ));
    };
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "not an operator's token",
        ))
    }
}
