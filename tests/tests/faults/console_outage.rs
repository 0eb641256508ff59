//! The operators' console while its database is down: a test's own
//! PostgreSQL server is stopped under a mounted console; the status and the
//! log's browser answer `503` with a JSON error naming the store (no hang,
//! no 500), and once the server is started again they answer `200` with no
//! restart of the service.

use outflow_tests as common;

use std::time::{Duration, Instant};

use outflow::admin::Admin;
use outflow::runner::ProjectionRunner;
use reqwest::StatusCode;
use serde_json::Value;

async fn get(http: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let response = http
        .get(url)
        .bearer_auth("op")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Asks `path` until it answers `wanted` (60 s at most); returns the body.
async fn until(http: &reqwest::Client, base: &str, path: &str, wanted: StatusCode) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(http, &format!("{base}{path}")).await;
        if status == wanted {
            return body;
        }
        assert!(
            status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {status} {body} (neither an answer nor 503)"
        );
        assert!(
            Instant::now() < deadline,
            "{path}: still {status} {body}, not {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_answers_503_while_the_database_is_down_and_recovers() {
    let server = common::own_postgres::OwnPostgres::start_new();
    let store = common::own_postgres::connect(&server.url()).await;
    let runner = ProjectionRunner::builder(store.clone())
        .build()
        .expect("runner");
    let console = Admin::new(runner)
        .operator_token("op")
        .events(store.clone())
        .router();
    let base = common::serve_console(console).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let paths = ["/api/status", "/api/events?type=account"];
    for path in paths {
        until(&http, &base, path, StatusCode::OK).await;
    }

    server.pg_ctl("stop");
    for path in paths {
        let body = until(&http, &base, path, StatusCode::SERVICE_UNAVAILABLE).await;
        assert_eq!(body["error"], "store", "{path}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{path}: the error says what failed: {body}"
        );
    }

    server.pg_ctl("start");
    for path in paths {
        until(&http, &base, path, StatusCode::OK).await;
    }
}
