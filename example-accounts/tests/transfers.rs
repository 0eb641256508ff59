//! The transfer process manager, end to end through the HTTP API on both
//! backends: a transfer to a closed account is compensated (the source gets
//! its money back), and a server killed with SIGKILL between a transfer's
//! debit and its credit finishes the transfer after a restart — no money
//! created or lost.

mod common;

use std::time::Duration;

use common::client::{balance, client, ended, get, open_with, post};
use common::{Backend, Database, Server};
use serde_json::json;

async fn compensates_a_refused_credit(backend: Backend) {
    let db = Database::new(backend, "compensation").await;
    let server = Server::start(&db.url, &[]);
    let client = client();
    let source = open_with(&client, &server, "Ann", 1_000).await;
    let target = open_with(&client, &server, "Carl", 0).await;
    post(
        &client,
        &server,
        &format!("/api/accounts/{target}/close"),
        json!({}),
    )
    .await;
    let transfer = post(
        &client,
        &server,
        "/api/transfers",
        json!({ "from": source, "to": target, "amount": 400 }),
    )
    .await;
    let transfer = transfer["transfer_id"].as_str().expect("a transfer id");
    assert_eq!(ended(&client, &server, transfer).await, "compensated");
    assert_eq!(balance(&client, &server, &source).await, 1_000);
    assert_eq!(balance(&client, &server, &target).await, 0);
    // The statement shows the money leaving and coming back.
    let (_, statement) = get(
        &client,
        &server,
        &format!("/api/accounts/{source}/statement?consistency=strong"),
    )
    .await;
    let kinds: Vec<&str> = statement["movements"]
        .as_array()
        .expect("movements")
        .iter()
        .map(|m| m["kind"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(kinds, ["deposit", "transfer out", "refund"], "{statement}");
}

async fn finishes_after_a_kill_between_steps(backend: Backend) {
    let db = Database::new(backend, "transfer_crash").await;
    let client = client();
    let mut first = Server::start(&db.url, &[("EXAMPLE_ACCOUNTS_HALT_BEFORE_CREDIT", "1")]);
    let source = open_with(&client, &first, "Ann", 1_000).await;
    let target = open_with(&client, &first, "Bob", 500).await;
    let transfer = post(
        &client,
        &first,
        "/api/transfers",
        json!({ "from": source, "to": target, "amount": 300 }),
    )
    .await;
    let transfer = transfer["transfer_id"]
        .as_str()
        .expect("a transfer id")
        .to_owned();
    assert!(
        first.wait_for_output("halted before the credit", Duration::from_secs(20)),
        "the process did not reach the credit\n{}",
        first.log()
    );
    // The debit is committed, the credit is not: the money is in flight.
    assert_eq!(balance(&client, &first, &source).await, 700);
    assert_eq!(balance(&client, &first, &target).await, 500);
    first.kill();

    let second = Server::start(&db.url, &[]);
    assert_eq!(ended(&client, &second, &transfer).await, "completed");
    let (a, b) = (
        balance(&client, &second, &source).await,
        balance(&client, &second, &target).await,
    );
    assert_eq!((a, b), (700, 800), "{}", second.log());
    assert_eq!(a + b, 1_500, "money created or lost");
    // Exactly one credit: the statement of the target has one transfer in.
    let (_, statement) = get(
        &client,
        &second,
        &format!("/api/accounts/{target}/statement?consistency=strong"),
    )
    .await;
    let credits = statement["movements"]
        .as_array()
        .expect("movements")
        .iter()
        .filter(|m| m["kind"] == "transfer in")
        .count();
    assert_eq!(credits, 1, "{statement}");
}

macro_rules! on_both {
    ($($scenario:ident: $sqlite:ident, $postgres:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            $scenario(Backend::Sqlite).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            $scenario(Backend::Postgres).await;
        }
    )*};
}

on_both! {
    compensates_a_refused_credit: compensation_on_sqlite, compensation_on_postgres;
    finishes_after_a_kill_between_steps: crash_between_steps_on_sqlite, crash_between_steps_on_postgres;
}
