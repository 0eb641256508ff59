//! Every error as JSON with the status the client should see: a 4xx when
//! the client caused it, 503 while a strong read waits, 500 otherwise.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use outflow::runner::WaitError;
use outflow::{CommandError, ErrorKind, StoreError};
use serde_json::json;

use crate::transfer::TransferError;
use crate::user::UserError;
use crate::BankError;

// ---------------------------------------------------------------- errors

/// A JSON error: `{"error": kind, "message": ...}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    pub(super) fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        }
        (
            self.status,
            Json(json!({ "error": self.kind, "message": self.message })),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let message = outflow::error::error_chain(&error);
        match error.kind() {
            _ if error.is_conflict() => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            ErrorKind::Transient | ErrorKind::Infrastructure => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

impl From<WaitError> for ApiError {
    fn from(error: WaitError) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_caught_up",
            outflow::error::error_chain(&error),
        )
    }
}

/// Maps a command's error: the aggregate's refusals to 404/409/422, lost
/// races to 409, the database's failures to 503.
pub(super) trait Refusal: std::error::Error + Sized + 'static {
    fn status(&self) -> (StatusCode, &'static str);
}

impl Refusal for BankError {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            BankError::NotOpen => (StatusCode::NOT_FOUND, "not_found"),
            BankError::AlreadyOpen => (StatusCode::CONFLICT, "conflict"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "refused"),
        }
    }
}

impl Refusal for UserError {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            UserError::AlreadySignedUp | UserError::EmailTaken => {
                (StatusCode::CONFLICT, "conflict")
            }
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "refused"),
        }
    }
}

impl Refusal for TransferError {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            TransferError::AlreadyRequested => (StatusCode::CONFLICT, "conflict"),
            TransferError::NotRequested => (StatusCode::NOT_FOUND, "not_found"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "refused"),
        }
    }
}

impl<E: Refusal> From<CommandError<E>> for ApiError {
    fn from(error: CommandError<E>) -> Self {
        match error {
            CommandError::Rejected(refusal) => {
                let (status, kind) = refusal.status();
                ApiError::new(status, kind, refusal.to_string())
            }
            // A refusal remembered from an earlier send that no longer
            // decodes into the error type.
            CommandError::Refused(refusal) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", refusal.message)
            }
            CommandError::Store(error) => error.into(),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                outflow::error::error_chain(&other),
            ),
        }
    }
}
