//! The transfer process manager, end to end through the HTTP API on both
//! backends: a transfer to a closed account is compensated (the source gets
//! its money back), and a server killed with SIGKILL between a transfer's
//! debit and its credit finishes the transfer after a restart — no money
//! created or lost.

mod common;

use std::time::Duration;

use common::{Backend, Database, Server};
use serde_json::{json, Value};

/// An HTTP client whose requests give up after 30 s: a server that stops
/// answering fails the test instead of hanging it.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

async fn post(client: &reqwest::Client, server: &Server, path: &str, body: Value) -> Value {
    let response = client
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .expect("send the request");
    let status = response.status();
    let body: Value = response.json().await.expect("a JSON answer");
    assert!(
        status.is_success(),
        "{path}: {status} {body}\n{}",
        server.log()
    );
    body
}

async fn get(client: &reqwest::Client, server: &Server, path: &str) -> (u16, Value) {
    let response = client
        .get(server.url(path))
        .send()
        .await
        .expect("send the request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

async fn open_with(client: &reqwest::Client, server: &Server, owner: &str, cents: i64) -> String {
    let opened = post(client, server, "/api/accounts", json!({ "owner": owner })).await;
    let id = opened["account_id"]
        .as_str()
        .expect("an account id")
        .to_owned();
    if cents > 0 {
        post(
            client,
            server,
            &format!("/api/accounts/{id}/deposits"),
            json!({ "amount": cents }),
        )
        .await;
    }
    id
}

/// Polls the transfer until it ends; returns its status.
async fn ended(client: &reqwest::Client, server: &Server, transfer: &str) -> String {
    for _ in 0..300 {
        let (status, body) = get(client, server, &format!("/api/transfers/{transfer}")).await;
        if status == 200 {
            let state = body["status"].as_str().unwrap_or_default().to_owned();
            if matches!(state.as_str(), "completed" | "compensated" | "failed") {
                return state;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "transfer {transfer} did not end within 15 s\n{}",
        server.log()
    );
}

async fn balance(client: &reqwest::Client, server: &Server, account: &str) -> i64 {
    let (status, body) = get(
        client,
        server,
        &format!("/api/accounts/{account}?consistency=strong"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["balance"].as_i64().expect("a balance")
}

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
