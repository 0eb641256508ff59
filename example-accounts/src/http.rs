//! The HTTP API, the live page and `/metrics` (see `docs/src/example.md`
//! for the routes). Commands are `POST`s with JSON bodies; queries are
//! `GET`s that read the projections, eventually consistent unless asked
//! for `?consistency=strong`. Every error is JSON with a 4xx status when the
//! client caused it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use metrics_exporter_prometheus::PrometheusHandle;
use outflow::pubsub::RecvError;
use outflow::runner::{RetryError, WaitError};
use outflow::{Checkpoint, CommandError, Committed, ErrorKind, StoreError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::{self, App, AppStore, EmailTaken};
use crate::transfer::{TransferCommand, TransferError};
use crate::user::{UserCommand, UserError};
use crate::{BankCommand, BankError};

/// The page at `/`.
const PAGE: &str = include_str!("../static/index.html");

/// The largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// The longest id accepted in a path or a body.
pub const MAX_ID: usize = 64;

/// How long a strong read waits for the projections.
const STRONG_WAIT: Duration = Duration::from_secs(5);

/// What the handlers share.
pub struct ApiState<S: AppStore> {
    /// The application.
    pub app: Arc<App<S>>,
    /// The operators' token; `None` disables the operator endpoints.
    pub admin_token: Option<String>,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Ends the live feeds when the server stops (a graceful shutdown waits
    /// for open connections).
    pub shutdown: outflow::CancellationToken,
}

/// The routes, on `state`.
pub fn router<S: AppStore>(state: ApiState<S>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics::<S>))
        .route("/api/users", post(sign_up::<S>).get(list_users::<S>))
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
        .route("/api/projections/{name}/rebuild", post(rebuild::<S>))
        .route("/api/projections/{name}/pause", post(pause::<S>))
        .route("/api/projections/{name}/resume", post(resume::<S>))
        .route("/api/dead-letters", get(dead_letters::<S>))
        .route("/api/dead-letters/{id}/retry", post(retry::<S>))
        .route("/api/dead-letters/{id}/discard", post(discard::<S>))
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
}

type Shared<S> = State<Arc<ApiState<S>>>;

// ---------------------------------------------------------------- errors

/// A JSON error: `{"error": kind, "message": ...}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    fn not_found(what: impl Into<String>) -> Self {
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
trait Refusal: std::error::Error + Sized + 'static {
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
            UserError::AlreadySignedUp => (StatusCode::CONFLICT, "conflict"),
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
            CommandError::Inline { error, .. }
                if error.source().downcast_ref::<EmailTaken>().is_some() =>
            {
                ApiError::new(StatusCode::CONFLICT, "conflict", error.source().to_string())
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

/// A JSON body whose every problem (not JSON, a missing field, a wrong
/// type) is a 400 with a JSON error.
pub struct Body<T>(T);

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
pub struct Params<T>(T);

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
pub struct PathParam(String);

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
fn check_length(field: &str, name: &str) -> Result<(), ApiError> {
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
fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
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

// ---------------------------------------------------------------- commands

#[derive(Deserialize)]
struct SignUp {
    name: String,
    email: String,
}

#[derive(Deserialize)]
struct Open {
    owner: String,
}

#[derive(Deserialize)]
struct Amount {
    amount: i64,
}

#[derive(Deserialize)]
struct NewTransfer {
    from: String,
    to: String,
    amount: i64,
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

fn position<A: outflow::cqrs_es::Aggregate>(done: &Committed<A>) -> u64 {
    done.checkpoint().map_or(0, |c| c.position)
}

async fn sign_up<S: AppStore>(
    State(state): Shared<S>,
    Body(body): Body<SignUp>,
) -> Result<impl IntoResponse, ApiError> {
    check_length("name", &body.name)?;
    let user_id = new_id("user");
    let done = state
        .app
        .users
        .execute(
            &user_id,
            UserCommand::SignUp {
                name: body.name,
                email: body.email,
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "user_id": user_id, "position": position(&done) })),
    ))
}

async fn open_account<S: AppStore>(
    State(state): Shared<S>,
    Body(body): Body<Open>,
) -> Result<impl IntoResponse, ApiError> {
    check_length("owner", &body.owner)?;
    let account_id = new_id("acc");
    let done = state
        .app
        .accounts
        .execute(&account_id, BankCommand::Open { owner: body.owner })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "account_id": account_id, "position": position(&done) })),
    ))
}

/// Runs an account command, retrying when another request changed the
/// account first (the retry reloads it, so the rules see the new balance).
async fn on_account<S: AppStore>(
    state: &ApiState<S>,
    account_id: &str,
    command: impl Fn() -> BankCommand,
) -> Result<Json<Value>, ApiError> {
    let done = state
        .app
        .accounts
        .execute_retrying(account_id, 20, command)
        .await?;
    Ok(Json(json!({
        "account_id": account_id,
        "version": done.version,
        "position": position(&done),
    })))
}

async fn deposit<S: AppStore>(
    State(state): Shared<S>,
    PathParam(id): PathParam,
    Body(body): Body<Amount>,
) -> Result<Json<Value>, ApiError> {
    check_id("account id", &id)?;
    on_account(&state, &id, || BankCommand::Deposit {
        amount: body.amount,
    })
    .await
}

async fn withdraw<S: AppStore>(
    State(state): Shared<S>,
    PathParam(id): PathParam,
    Body(body): Body<Amount>,
) -> Result<Json<Value>, ApiError> {
    check_id("account id", &id)?;
    on_account(&state, &id, || BankCommand::Withdraw {
        amount: body.amount,
    })
    .await
}

async fn close<S: AppStore>(
    State(state): Shared<S>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    check_id("account id", &id)?;
    on_account(&state, &id, || BankCommand::Close).await
}

async fn transfer<S: AppStore>(
    State(state): Shared<S>,
    Body(body): Body<NewTransfer>,
) -> Result<impl IntoResponse, ApiError> {
    check_id("source account id", &body.from)?;
    check_id("target account id", &body.to)?;
    for account in [&body.from, &body.to] {
        let (loaded, _) = state.app.accounts.load(account).await?;
        if !loaded.opened {
            return Err(ApiError::not_found(format!("no account {account}")));
        }
    }
    let transfer_id = new_id("tr");
    let done = state
        .app
        .transfers
        .execute(
            &transfer_id,
            TransferCommand::Request {
                from: body.from,
                to: body.to,
                amount: body.amount,
            },
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "transfer_id": transfer_id, "position": position(&done) })),
    ))
}

// ---------------------------------------------------------------- queries

#[derive(Deserialize)]
struct Consistency {
    consistency: Option<String>,
}

/// With `?consistency=strong`, waits until `projections` have every event
/// committed before the request.
async fn consistent<S: AppStore>(
    state: &ApiState<S>,
    query: &Consistency,
    projections: &[&str],
) -> Result<(), ApiError> {
    match query.consistency.as_deref() {
        None | Some("eventual") => Ok(()),
        Some("strong") => {
            // Every event committed before this request, even those an
            // open transaction still keeps log readers from.
            let head = state.app.store.committed_head().await?;
            if head != Checkpoint::START {
                state
                    .app
                    .runner
                    .wait_for(head, projections, STRONG_WAIT)
                    .await?;
            }
            Ok(())
        }
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("consistency is `strong` or `eventual`, not `{other}`"),
        )),
    }
}

#[derive(Serialize)]
struct AccountOut {
    account_id: String,
    owner: String,
    balance: i64,
    closed: bool,
}

async fn list_accounts<S: AppStore>(
    State(state): Shared<S>,
    Params(query): Params<Consistency>,
) -> Result<Json<Vec<AccountOut>>, ApiError> {
    consistent(&state, &query, &[app::BALANCES]).await?;
    let rows = state.app.balances.list(None, 1000).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(account_id, b)| AccountOut {
                account_id,
                owner: b.owner,
                balance: b.balance,
                closed: b.closed,
            })
            .collect(),
    ))
}

async fn get_account<S: AppStore>(
    State(state): Shared<S>,
    PathParam(id): PathParam,
    Params(query): Params<Consistency>,
) -> Result<Json<AccountOut>, ApiError> {
    check_id("account id", &id)?;
    consistent(&state, &query, &[app::BALANCES]).await?;
    let balance = state
        .app
        .balances
        .load(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no account {id}")))?;
    Ok(Json(AccountOut {
        account_id: id,
        owner: balance.owner,
        balance: balance.balance,
        closed: balance.closed,
    }))
}

async fn get_statement<S: AppStore>(
    State(state): Shared<S>,
    PathParam(id): PathParam,
    Params(query): Params<Consistency>,
) -> Result<Json<Value>, ApiError> {
    check_id("account id", &id)?;
    consistent(&state, &query, &[app::BALANCES, app::STATEMENTS]).await?;
    if state.app.balances.load(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no account {id}")));
    }
    let statement = state.app.statements.load(&id).await?.unwrap_or_default();
    Ok(Json(
        json!({ "account_id": id, "movements": statement.movements }),
    ))
}

async fn list_users<S: AppStore>(
    State(state): Shared<S>,
    Params(query): Params<Consistency>,
) -> Result<Json<Vec<Value>>, ApiError> {
    consistent(&state, &query, &[app::USERS]).await?;
    let rows = state.app.directory.list(None, 1000).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(user_id, u)| json!({ "user_id": user_id, "name": u.name, "email": u.email }))
            .collect(),
    ))
}

fn transfer_json(transfer_id: String, t: crate::views::TransferStatus) -> Value {
    json!({
        "transfer_id": transfer_id,
        "from": t.from,
        "to": t.to,
        "amount": t.amount,
        "status": t.status,
        "reason": t.reason,
    })
}

async fn list_transfers<S: AppStore>(
    State(state): Shared<S>,
    Params(query): Params<Consistency>,
) -> Result<Json<Vec<Value>>, ApiError> {
    consistent(&state, &query, &[app::TRANSFERS]).await?;
    let rows = state.app.transfer_status.list(None, 1000).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(id, t)| transfer_json(id, t))
            .collect(),
    ))
}

async fn get_transfer<S: AppStore>(
    State(state): Shared<S>,
    PathParam(id): PathParam,
    Params(query): Params<Consistency>,
) -> Result<Json<Value>, ApiError> {
    check_id("transfer id", &id)?;
    consistent(&state, &query, &[app::TRANSFERS]).await?;
    let transfer = state
        .app
        .transfer_status
        .load(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no transfer {id}")))?;
    Ok(Json(transfer_json(id, transfer)))
}

async fn list_emails<S: AppStore>(
    State(state): Shared<S>,
) -> Result<Json<Vec<app::SentEmail>>, ApiError> {
    Ok(Json(state.app.store.sent_emails().await?))
}

async fn projections<S: AppStore>(State(state): Shared<S>) -> Result<Json<Vec<Value>>, ApiError> {
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

async fn dead_letters<S: AppStore>(State(state): Shared<S>) -> Result<Json<Vec<Value>>, ApiError> {
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
fn authorize<S: AppStore>(state: &ApiState<S>, headers: &HeaderMap) -> Result<(), ApiError> {
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A dead letter's id from the path, after authorization.
fn dead_letter_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a dead letter's id is a whole number",
        )
    })
}

fn known_projection(name: &str) -> Result<(), ApiError> {
    if app::PROJECTIONS.contains(&name) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no projection {name}")))
    }
}

async fn rebuild<S: AppStore>(
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

async fn pause<S: AppStore>(
    State(state): Shared<S>,
    headers: HeaderMap,
    PathParam(name): PathParam,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    known_projection(&name)?;
    state.app.runner.pause(&name).await?;
    Ok(Json(json!({ "projection": name, "paused": true })))
}

async fn resume<S: AppStore>(
    State(state): Shared<S>,
    headers: HeaderMap,
    PathParam(name): PathParam,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    known_projection(&name)?;
    state.app.runner.resume(&name).await?;
    Ok(Json(json!({ "projection": name, "paused": false })))
}

async fn retry<S: AppStore>(
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

async fn discard<S: AppStore>(
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

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn metrics<S: AppStore>(State(state): Shared<S>) -> Response {
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
async fn events<S: AppStore>(
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
