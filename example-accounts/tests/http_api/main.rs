//! The HTTP API of `docs/src/example.md`, end to end: a real server process
//! (see `common`) on a fresh SQLite file and on a fresh PostgreSQL database,
//! driven by a real HTTP client. Every scenario runs on both backends
//! (`sqlite::NAME` and `postgres::NAME`) and proves that:
//!
//! - `commands_and_queries`: the commands answer with the documented
//!   statuses and bodies, strong reads see the writes at once (balances, the
//!   account list, the statement with its running balance, the users), the
//!   welcome e-mail is sent exactly once, a transfer completes and moves the
//!   money, and an emptied account closes and then refuses deposits;
//! - `bad_input`: bad bodies are 400, unknown accounts 404, broken rules 422,
//!   a duplicate address 409, every error is JSON and never a 5xx, a refused
//!   command writes nothing, and a transfer to an unknown account loses no
//!   money;
//! - `operator_endpoints`: the operators' console at `/admin` needs the
//!   bearer token (401 without or with a wrong one), is off (403 `disabled`)
//!   when the server has no token, and rebuilds with it; the example's own
//!   operator routes are gone (404);
//! - `concurrent_withdrawals`: 50 racing withdrawals never overdraw the
//!   account and the statement holds exactly the accepted ones;
//! - `strong_consistency`: a strong read right after a deposit always sees it;
//! - `metrics_and_projections`: `/metrics` and `/api/projections` answer;
//! - `graceful_shutdown`: SIGTERM stops the server cleanly, even with a live
//!   feed open.

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Backend, Database, Server};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};

mod commands;
mod hostile;
mod operations;

use commands::*;
use hostile::*;
use operations::*;

/// The operators' token the servers of these tests are started with.
const TOKEN: &str = "secret";

/// A transfer's documented statuses.
const TRANSFER_STATUSES: [&str; 6] = [
    "requested",
    "crediting",
    "compensating",
    "completed",
    "compensated",
    "failed",
];

/// Generates, for each scenario, `sqlite::SCENARIO` and `postgres::SCENARIO`.
macro_rules! on_both_backends {
    ($($scenario:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Sqlite).await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Postgres).await;
                }
            )+
        }
    };
}

on_both_backends!(
    commands_and_queries,
    bad_input,
    hostile_input,
    operator_endpoints,
    concurrent_withdrawals,
    strong_consistency,
    metrics_and_projections,
    graceful_shutdown,
);

// ---------------------------------------------------------------- helpers

/// One answer: its status, content type and body (parsed when it is JSON,
/// `Null` otherwise).
struct Reply {
    status: u16,
    content_type: String,
    text: String,
    json: Value,
}

/// A client talking to one server; every failed expectation shows the
/// server's log.
struct Api<'a> {
    client: reqwest::Client,
    server: &'a Server,
}

/// `path` with `consistency=strong` added to its query.
fn strong(path: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}consistency=strong")
}

/// A unique e-mail address, so that no two tests share one.
fn unique_email(name: &str) -> String {
    format!(
        "{name}-{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

impl<'a> Api<'a> {
    fn new(server: &'a Server) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("build the HTTP client");
        Api { client, server }
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Reply {
        let response = request
            .send()
            .await
            .unwrap_or_else(|error| panic!("{what}: {error}\n{}", self.server.log()));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.unwrap_or_else(|error| {
            panic!("{what}: reading the body: {error}\n{}", self.server.log())
        });
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            text,
            json,
        }
    }

    /// `POST path` with `body` as JSON.
    async fn post_json(&self, path: &str, body: Value) -> Reply {
        let request = self.client.post(self.server.url(path)).json(&body);
        self.send(request, &format!("POST {path} {body}")).await
    }

    /// `POST path` with `body` sent verbatim as `application/json`.
    async fn post_raw(&self, path: &str, body: &'static str) -> Reply {
        let request = self
            .client
            .post(self.server.url(path))
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        self.send(request, &format!("POST {path} {body}")).await
    }

    /// `POST path` without a body, with `Authorization: authorization` when
    /// given.
    async fn post_empty(&self, path: &str, authorization: Option<&str>) -> Reply {
        let mut request = self.client.post(self.server.url(path));
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        self.send(request, &format!("POST {path} ({authorization:?})"))
            .await
    }

    /// `GET path`.
    async fn get(&self, path: &str) -> Reply {
        let request = self.client.get(self.server.url(path));
        self.send(request, &format!("GET {path}")).await
    }

    /// Asserts `reply` has `status` and returns its JSON body.
    fn expect(&self, reply: &Reply, status: u16, what: &str) -> Value {
        assert_eq!(
            reply.status,
            status,
            "{what}: expected {status}, got {} {}\nserver log:\n{}",
            reply.status,
            reply.text,
            self.server.log()
        );
        reply.json.clone()
    }

    /// Asserts `reply` is a documented error: not a 5xx, `status`, JSON
    /// content `{"error", "message"}`. Returns the error's kind.
    fn expect_error(&self, reply: &Reply, status: u16, what: &str) -> String {
        assert!(
            reply.status < 500,
            "{what}: a server error {} {}\nserver log:\n{}",
            reply.status,
            reply.text,
            self.server.log()
        );
        self.expect(reply, status, what);
        self.json_error(reply, what)
    }

    /// Asserts `reply` carries a JSON error body; returns its kind.
    fn json_error(&self, reply: &Reply, what: &str) -> String {
        assert!(
            reply.content_type.starts_with("application/json"),
            "{what}: error with content type `{}`: {}",
            reply.content_type,
            reply.text
        );
        let kind = reply.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no string `error` in {}", reply.text));
        assert!(!kind.is_empty(), "{what}: an empty error kind");
        assert!(
            reply.json["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: no `message` in {}",
            reply.text
        );
        kind.to_owned()
    }

    /// Signs a user up (201); returns the user id.
    async fn sign_up(&self, name: &str, email: &str) -> String {
        let reply = self
            .post_json("/api/users", json!({ "name": name, "email": email }))
            .await;
        let body = self.expect(&reply, 201, "sign up");
        assert!(body["position"].is_u64(), "sign up: no position in {body}");
        body["user_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| panic!("sign up: no user_id in {body}"))
            .to_owned()
    }

    /// Opens an account for `owner` (201); returns the account id.
    async fn open(&self, owner: &str) -> String {
        let reply = self
            .post_json("/api/accounts", json!({ "owner": owner }))
            .await;
        let body = self.expect(&reply, 201, "open an account");
        assert!(body["position"].is_u64(), "open: no position in {body}");
        body["account_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| panic!("open: no account_id in {body}"))
            .to_owned()
    }

    /// Deposits or withdraws (`kind` is `deposits` or `withdrawals`) and
    /// expects 200 with the documented body; returns it.
    async fn move_money(&self, account: &str, kind: &str, amount: i64) -> Value {
        let path = format!("/api/accounts/{account}/{kind}");
        let reply = self.post_json(&path, json!({ "amount": amount })).await;
        let body = self.expect(&reply, 200, &format!("{kind} of {amount}"));
        assert_eq!(body["account_id"], account, "{kind}: {body}");
        assert!(body["version"].is_u64(), "{kind}: no version in {body}");
        assert!(body["position"].is_u64(), "{kind}: no position in {body}");
        body
    }

    async fn deposit(&self, account: &str, amount: i64) -> Value {
        self.move_money(account, "deposits", amount).await
    }

    async fn withdraw(&self, account: &str, amount: i64) -> Value {
        self.move_money(account, "withdrawals", amount).await
    }

    /// The account, read strongly (200).
    async fn account(&self, account: &str) -> Value {
        let reply = self.get(&strong(&format!("/api/accounts/{account}"))).await;
        let body = self.expect(&reply, 200, &format!("GET account {account}"));
        assert_eq!(body["account_id"], account, "GET account: {body}");
        body
    }

    /// The account's balance, read strongly.
    async fn balance(&self, account: &str) -> i64 {
        let body = self.account(account).await;
        body["balance"]
            .as_i64()
            .unwrap_or_else(|| panic!("no integer balance in {body}"))
    }

    /// The account's movements, read strongly.
    async fn movements(&self, account: &str) -> Vec<Value> {
        let path = strong(&format!("/api/accounts/{account}/statement"));
        let body = self.expect(&self.get(&path).await, 200, "GET statement");
        assert_eq!(body["account_id"], account, "statement: {body}");
        body["movements"]
            .as_array()
            .unwrap_or_else(|| panic!("no movements array in {body}"))
            .clone()
    }

    /// The users of the directory (read strongly) with `email`.
    async fn users_with(&self, email: &str) -> Vec<Value> {
        let body = self.expect(&self.get(&strong("/api/users")).await, 200, "GET users");
        body.as_array()
            .unwrap_or_else(|| panic!("users: not an array: {body}"))
            .iter()
            .filter(|user| user["email"] == email)
            .cloned()
            .collect()
    }

    /// The e-mails sent to `to`.
    async fn emails_to(&self, to: &str) -> Vec<Value> {
        let body = self.expect(&self.get("/api/emails").await, 200, "GET emails");
        body.as_array()
            .unwrap_or_else(|| panic!("emails: not an array: {body}"))
            .iter()
            .filter(|email| email["to"] == to)
            .cloned()
            .collect()
    }

    /// Polls the transfer until its status is one of `ends`; returns it.
    /// A transfer not yet in the view (404) is still polled.
    async fn transfer_ending(&self, transfer: &str, ends: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let reply = self.get(&format!("/api/transfers/{transfer}")).await;
            match reply.status {
                200 => {
                    let status = reply.json["status"].as_str().unwrap_or_default();
                    if ends.contains(&status) {
                        return reply.json;
                    }
                    assert!(
                        TRANSFER_STATUSES.contains(&status),
                        "transfer {transfer}: undocumented status in {}",
                        reply.text
                    );
                }
                404 => {}
                other => panic!(
                    "GET transfer {transfer}: {other} {}\n{}",
                    reply.text,
                    self.server.log()
                ),
            }
            last = reply.text;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "transfer {transfer} did not reach {ends:?} within {timeout:?}; last: {last}\nserver log:\n{}",
            self.server.log()
        );
    }
}

/// A statement line as (kind, |amount|, balance after, transfer id).
type Line = (String, i64, i64, Option<String>);

/// A movement as a [`Line`]: the contract
/// does not say which sign a withdrawal's amount has, so only its size is
/// compared; the running balance is compared exactly.
fn movement(value: &Value) -> Line {
    (
        value["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("no kind in {value}"))
            .to_owned(),
        value["amount"]
            .as_i64()
            .unwrap_or_else(|| panic!("no integer amount in {value}"))
            .abs(),
        value["balance"]
            .as_i64()
            .unwrap_or_else(|| panic!("no integer balance in {value}")),
        value["transfer_id"].as_str().map(str::to_owned),
    )
}

fn expected(kind: &str, amount: i64, balance: i64, transfer: Option<&str>) -> Line {
    (
        kind.to_owned(),
        amount,
        balance,
        transfer.map(str::to_owned),
    )
}

fn position(body: &Value) -> u64 {
    body["position"]
        .as_u64()
        .unwrap_or_else(|| panic!("no position in {body}"))
}

fn version(body: &Value) -> u64 {
    body["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version in {body}"))
}

async fn start(backend: Backend, label: &str, env: &[(&str, &str)]) -> (Database, Server) {
    let db = Database::new(backend, label).await;
    let server = Server::start(&db.url, env);
    (db, server)
}
