//! An HTTP client for the example's API, shared by the tests that drive
//! transfers: requests that fail the test with the server's log, strong
//! reads that wait out a killed server's leases, and the bank's calls.

use std::time::Duration;

use serde_json::{json, Value};

use super::Server;

/// An HTTP client whose requests give up after 30 s: a server that stops
/// answering fails the test instead of hanging it.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

pub async fn post(client: &reqwest::Client, server: &Server, path: &str, body: Value) -> Value {
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

pub async fn get(client: &reqwest::Client, server: &Server, path: &str) -> (u16, Value) {
    let response = client
        .get(server.url(path))
        .send()
        .await
        .expect("send the request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

pub async fn open_with(
    client: &reqwest::Client,
    server: &Server,
    owner: &str,
    cents: i64,
) -> String {
    let opened = post(client, server, "/api/accounts", json!({ "owner": owner })).await;
    let id = opened["account_id"]
        .as_str()
        .expect("an account id")
        .to_owned();
    if cents > 0 {
        deposit(client, server, &id, cents).await;
    }
    id
}

pub async fn deposit(client: &reqwest::Client, server: &Server, account: &str, cents: i64) {
    post(
        client,
        server,
        &format!("/api/accounts/{account}/deposits"),
        json!({ "amount": cents }),
    )
    .await;
}

pub async fn ended(client: &reqwest::Client, server: &Server, transfer: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
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
        "transfer {transfer} did not end within 60 s\n{}",
        server.log()
    );
}

/// A strong read, tried again while the projections are not caught up: a
/// SIGKILLed server's leases hold its units until they expire.
pub async fn strong_get(client: &reqwest::Client, server: &Server, path: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(client, server, path).await;
        if status == 200 {
            return body;
        }
        assert!(
            status == 503 && tokio::time::Instant::now() < deadline,
            "{path}: {status} {body}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn balance(client: &reqwest::Client, server: &Server, account: &str) -> i64 {
    let body = strong_get(
        client,
        server,
        &format!("/api/accounts/{account}?consistency=strong"),
    )
    .await;
    body["balance"].as_i64().expect("a balance")
}

/// The kinds of an account's movements, in order.
pub async fn movements(client: &reqwest::Client, server: &Server, account: &str) -> Vec<String> {
    let statement = strong_get(
        client,
        server,
        &format!("/api/accounts/{account}/statement?consistency=strong"),
    )
    .await;
    statement["movements"]
        .as_array()
        .expect("movements")
        .iter()
        .map(|m| m["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}
