//! The command endpoints: sign up, open, deposit, withdraw, close, transfer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use outflow::Committed;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::app::AppStore;
use crate::transfer::TransferCommand;
use crate::user::Register;
use crate::BankCommand;

use super::errors::*;
use super::extract::*;
use super::state::*;

// ---------------------------------------------------------------- commands

#[derive(Deserialize)]
pub(super) struct SignUp {
    name: String,
    email: String,
}

#[derive(Deserialize)]
pub(super) struct Open {
    owner: String,
}

#[derive(Deserialize)]
pub(super) struct Amount {
    amount: i64,
}

#[derive(Deserialize)]
pub(super) struct NewTransfer {
    from: String,
    to: String,
    amount: i64,
}

pub(super) fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

pub(super) fn position<A: outflow::cqrs_es::Aggregate>(done: &Committed<A>) -> u64 {
    done.checkpoint().map_or(0, |c| c.position)
}

pub(super) async fn sign_up<S: AppStore>(
    State(state): Shared<S>,
    Body(body): Body<SignUp>,
) -> Result<impl IntoResponse, ApiError> {
    check_length("name", &body.name)?;
    let user_id = new_id("user");
    let done = state
        .app
        .sign_ups
        .execute(Register {
            user_id: user_id.clone(),
            name: body.name,
            email: body.email,
        })
        .await?;
    let position = done.checkpoint().map_or(0, |c| c.position);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "user_id": user_id, "position": position })),
    ))
}

/// Forgets a user (operators only: `Authorization: Bearer <token>`): the
/// mail server's copies of their address erased, then their key deleted,
/// so their name and address read as forgotten everywhere — events,
/// snapshots, views, backups taken from now on. The address can be signed
/// up with again.
pub(super) async fn forget_user<S: AppStore>(
    State(state): Shared<S>,
    headers: axum::http::HeaderMap,
    PathParam(user_id): PathParam,
) -> Result<Json<Value>, ApiError> {
    check_operator(&state, &headers)?;
    check_id("user", &user_id)?;
    let (user, _) = state.app.users.load(&user_id).await?;
    if !user.signed_up {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such user",
        ));
    }
    // Copies outside Outflow first: once the key is gone, the address
    // they are found by is gone too. A failure here forgets nothing, and
    // the request can be sent again.
    if let Some(email) = user.email.value() {
        state.app.store.erase_sent_emails(email).await?;
        state.app.store.scrub().await?;
    }
    let forgotten = state.app.keys.forget(&user_id).await?;
    tracing::info!(user = %user_id, newly = forgotten, "user forgotten");
    Ok(Json(json!({ "user_id": user_id, "forgotten": true })))
}

pub(super) async fn open_account<S: AppStore>(
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
pub(super) async fn on_account<S: AppStore>(
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

pub(super) async fn deposit<S: AppStore>(
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

pub(super) async fn withdraw<S: AppStore>(
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

pub(super) async fn close<S: AppStore>(
    State(state): Shared<S>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    check_id("account id", &id)?;
    on_account(&state, &id, || BankCommand::Close).await
}

pub(super) async fn transfer<S: AppStore>(
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
