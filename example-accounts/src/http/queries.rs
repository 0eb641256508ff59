//! The query endpoints, eventually consistent unless asked for
//! `?consistency=strong`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use outflow::Checkpoint;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::{self, AppStore};

use super::errors::*;
use super::extract::*;
use super::state::*;

// ---------------------------------------------------------------- queries

#[derive(Deserialize)]
pub(super) struct Consistency {
    consistency: Option<String>,
}

/// With `?consistency=strong`, waits until `projections` have every event
/// committed before the request.
pub(super) async fn consistent<S: AppStore>(
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
pub(super) struct AccountOut {
    account_id: String,
    owner: String,
    balance: i64,
    closed: bool,
}

pub(super) async fn list_accounts<S: AppStore>(
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

pub(super) async fn get_account<S: AppStore>(
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

pub(super) async fn get_statement<S: AppStore>(
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

pub(super) async fn list_users<S: AppStore>(
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

pub(super) fn transfer_json(transfer_id: String, t: crate::views::TransferStatus) -> Value {
    json!({
        "transfer_id": transfer_id,
        "from": t.from,
        "to": t.to,
        "amount": t.amount,
        "status": t.status,
        "reason": t.reason,
    })
}

pub(super) async fn list_transfers<S: AppStore>(
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

pub(super) async fn get_transfer<S: AppStore>(
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

pub(super) async fn list_emails<S: AppStore>(
    State(state): Shared<S>,
) -> Result<Json<Vec<app::SentEmail>>, ApiError> {
    Ok(Json(state.app.store.sent_emails().await?))
}
