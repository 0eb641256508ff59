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
//! - `operator_endpoints`: the operator endpoints need the bearer token (401
//!   without, 403 with a wrong one) and are disabled (403 `disabled`) when the
//!   server has no token;
//! - `concurrent_withdrawals`: 50 racing withdrawals never overdraw the
//!   account and the statement holds exactly the accepted ones;
//! - `strong_consistency`: a strong read right after a deposit always sees it;
//! - `metrics_and_projections`: `/metrics` and `/api/projections` answer;
//! - `graceful_shutdown`: SIGTERM stops the server cleanly, even with a live
//!   feed open.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Database, Server};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};

/// The operators' token the servers of these tests are started with.
const TOKEN: &str = "secret";

/// A transfer's documented statuses.
const TRANSFER_STATUSES: [&str; 5] = [
    "requested",
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

// ---------------------------------------------------------------- scenarios

async fn commands_and_queries(backend: Backend) {
    let (_db, server) = start(backend, "http_commands", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);

    let email = unique_email("ada");
    let user = api.sign_up("Ada", &email).await;
    let alice = api.open(&user).await;
    let bob = api.open(&user).await;
    assert_ne!(alice, bob, "two accounts got the same id");

    let deposited = api.deposit(&alice, 1000).await;
    let withdrawn = api.withdraw(&alice, 250).await;
    let bob_deposited = api.deposit(&bob, 200).await;
    assert!(
        position(&deposited) < position(&withdrawn)
            && position(&withdrawn) < position(&bob_deposited),
        "log positions do not grow: {deposited} {withdrawn} {bob_deposited}"
    );
    assert!(
        version(&deposited) < version(&withdrawn),
        "the account's version did not grow: {deposited} {withdrawn}"
    );

    // Strong reads see the writes at once.
    let account = api.account(&alice).await;
    assert_eq!(
        account["balance"], 750,
        "balance after the withdrawal: {account}"
    );
    assert_eq!(account["owner"], user.as_str(), "owner: {account}");
    assert_eq!(account["closed"], false, "closed: {account}");
    assert_eq!(api.balance(&bob).await, 200, "bob's balance");

    let list = api.expect(
        &api.get(&strong("/api/accounts")).await,
        200,
        "GET accounts",
    );
    let list = list.as_array().expect("the account list is an array");
    for (id, balance) in [(&alice, 750), (&bob, 200)] {
        let found: Vec<_> = list
            .iter()
            .filter(|a| a["account_id"] == id.as_str())
            .collect();
        assert_eq!(found.len(), 1, "account {id} in the list: {list:?}");
        assert_eq!(found[0]["balance"], balance, "account {id} in the list");
        assert_eq!(found[0]["owner"], user.as_str(), "account {id} in the list");
        assert_eq!(found[0]["closed"], false, "account {id} in the list");
    }

    let movements: Vec<_> = api.movements(&alice).await.iter().map(movement).collect();
    assert_eq!(
        movements,
        vec![
            expected("deposit", 1000, 1000, None),
            expected("withdrawal", 250, 750, None),
        ],
        "alice's statement before the transfer"
    );

    let users = api.users_with(&email).await;
    assert_eq!(
        users.len(),
        1,
        "the directory lists {email} once: {users:?}"
    );
    assert_eq!(users[0]["user_id"], user.as_str(), "the user's id");
    assert_eq!(users[0]["name"], "Ada", "the user's name");

    // The welcome e-mail, sent by a projection effect, eventually.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut emails = api.emails_to(&email).await;
    while emails.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        emails = api.emails_to(&email).await;
    }
    assert_eq!(
        emails.len(),
        1,
        "exactly one welcome e-mail to {email} within 10 s: {emails:?}\nserver log:\n{}",
        server.log()
    );
    assert!(
        emails[0]["key"].as_str().is_some_and(|k| !k.is_empty())
            && emails[0]["subject"].as_str().is_some_and(|s| !s.is_empty()),
        "the e-mail has a key and a subject: {}",
        emails[0]
    );

    // A transfer, run by the process manager.
    let reply = api
        .post_json(
            "/api/transfers",
            json!({ "from": alice, "to": bob, "amount": 300 }),
        )
        .await;
    let accepted = api.expect(&reply, 202, "transfer");
    assert!(
        accepted["position"].is_u64(),
        "transfer: no position in {accepted}"
    );
    let transfer = accepted["transfer_id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("no transfer_id in {accepted}"))
        .to_owned();
    let done = api
        .transfer_ending(
            &transfer,
            &["completed", "compensated", "failed"],
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(
        done["status"],
        "completed",
        "the transfer: {done}\n{}",
        server.log()
    );
    assert_eq!(
        done["transfer_id"],
        transfer.as_str(),
        "the transfer: {done}"
    );
    assert_eq!(done["from"], alice.as_str(), "the transfer: {done}");
    assert_eq!(done["to"], bob.as_str(), "the transfer: {done}");
    assert_eq!(done["amount"], 300, "the transfer: {done}");
    let listed = api.expect(
        &api.get(&strong("/api/transfers")).await,
        200,
        "GET transfers",
    );
    assert!(
        listed
            .as_array()
            .expect("the transfer list is an array")
            .iter()
            .any(|t| t["transfer_id"] == transfer.as_str() && t["status"] == "completed"),
        "the completed transfer in the list: {listed}"
    );

    assert_eq!(api.balance(&alice).await, 450, "alice after the transfer");
    assert_eq!(api.balance(&bob).await, 500, "bob after the transfer");
    let movements: Vec<_> = api.movements(&alice).await.iter().map(movement).collect();
    assert_eq!(
        movements,
        vec![
            expected("deposit", 1000, 1000, None),
            expected("withdrawal", 250, 750, None),
            expected("transfer out", 300, 450, Some(&transfer)),
        ],
        "alice's statement"
    );
    let movements: Vec<_> = api.movements(&bob).await.iter().map(movement).collect();
    assert_eq!(
        movements,
        vec![
            expected("deposit", 200, 200, None),
            expected("transfer in", 300, 500, Some(&transfer)),
        ],
        "bob's statement"
    );

    // Closing: refused while money is left, accepted once emptied; a
    // closed account refuses deposits.
    let refused = api
        .post_empty(&format!("/api/accounts/{bob}/close"), None)
        .await;
    api.expect_error(&refused, 422, "close an account holding money");
    api.withdraw(&bob, 500).await;
    let closed = api
        .post_empty(&format!("/api/accounts/{bob}/close"), None)
        .await;
    let closed = api.expect(&closed, 200, "close the emptied account");
    assert_eq!(closed["account_id"], bob.as_str(), "close: {closed}");
    assert!(
        closed["version"].is_u64() && closed["position"].is_u64(),
        "close: {closed}"
    );
    let account = api.account(&bob).await;
    assert_eq!(account["closed"], true, "bob after closing: {account}");
    assert_eq!(account["balance"], 0, "bob after closing: {account}");
    let refused = api
        .post_json(
            &format!("/api/accounts/{bob}/deposits"),
            json!({ "amount": 10 }),
        )
        .await;
    api.expect_error(&refused, 422, "deposit on a closed account");
    assert_eq!(
        api.balance(&bob).await,
        0,
        "the refused deposit wrote nothing"
    );

    // Still exactly one welcome e-mail.
    assert_eq!(
        api.emails_to(&email).await.len(),
        1,
        "welcome e-mails at the end"
    );
}

async fn bad_input(backend: Backend) {
    let (_db, server) = start(backend, "http_bad_input", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    let account = api.open("Grace").await;
    api.deposit(&account, 500).await;
    let deposits = format!("/api/accounts/{account}/deposits");
    let withdrawals = format!("/api/accounts/{account}/withdrawals");

    // Bodies that are not JSON, lack a field or have a wrong type: 400.
    let reply = api.post_raw(&deposits, "{\"amount\": ").await;
    api.expect_error(&reply, 400, "malformed JSON deposit");
    let reply = api.post_raw("/api/users", "not json at all").await;
    api.expect_error(&reply, 400, "malformed JSON sign-up");
    let reply = api
        .post_json("/api/users", json!({ "name": "Grace" }))
        .await;
    api.expect_error(&reply, 400, "sign-up without an e-mail");
    let reply = api.post_json(&deposits, json!({})).await;
    api.expect_error(&reply, 400, "deposit without an amount");
    let reply = api
        .post_json("/api/transfers", json!({ "from": account, "amount": 5 }))
        .await;
    api.expect_error(&reply, 400, "transfer without a target");
    let reply = api.post_json(&deposits, json!({ "amount": "100" })).await;
    api.expect_error(&reply, 400, "an amount as a string");

    // Unknown accounts: 404.
    let unknown = format!("acc-unknown-{}", uuid::Uuid::new_v4().simple());
    let reply = api
        .post_json(
            &format!("/api/accounts/{unknown}/deposits"),
            json!({ "amount": 10 }),
        )
        .await;
    api.expect_error(&reply, 404, "deposit on an unknown account");
    let reply = api
        .post_json(
            &format!("/api/accounts/{unknown}/withdrawals"),
            json!({ "amount": 10 }),
        )
        .await;
    api.expect_error(&reply, 404, "withdrawal from an unknown account");
    let reply = api.get(&format!("/api/accounts/{unknown}")).await;
    api.expect_error(&reply, 404, "GET an unknown account");
    let reply = api.get(&strong(&format!("/api/accounts/{unknown}"))).await;
    api.expect_error(&reply, 404, "GET an unknown account, strongly");

    // Broken rules: 422.
    for amount in [0, -5] {
        let reply = api.post_json(&deposits, json!({ "amount": amount })).await;
        api.expect_error(&reply, 422, &format!("deposit of {amount}"));
        let reply = api
            .post_json(&withdrawals, json!({ "amount": amount }))
            .await;
        api.expect_error(&reply, 422, &format!("withdrawal of {amount}"));
    }
    let reply = api.post_json(&withdrawals, json!({ "amount": 501 })).await;
    api.expect_error(&reply, 422, "overdraw");

    // A refused command writes nothing.
    assert_eq!(
        api.balance(&account).await,
        500,
        "the balance after the refusals"
    );
    let movements: Vec<_> = api.movements(&account).await.iter().map(movement).collect();
    assert_eq!(
        movements,
        vec![expected("deposit", 500, 500, None)],
        "the statement after the refusals"
    );

    // A duplicate address: 409, and the directory keeps one user.
    let email = unique_email("grace");
    let first = api.sign_up("Grace", &email).await;
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": "Other Grace", "email": email }),
        )
        .await;
    api.expect_error(&reply, 409, "sign-up with a taken address");
    let users = api.users_with(&email).await;
    assert_eq!(
        users.len(),
        1,
        "the directory lists {email} once: {users:?}"
    );
    assert_eq!(
        users[0]["user_id"],
        first.as_str(),
        "the first sign-up keeps the address"
    );

    // A transfer to an unknown account: refused at once, or accepted and
    // then undone; either way no money is lost.
    let reply = api
        .post_json(
            "/api/transfers",
            json!({ "from": account, "to": unknown, "amount": 100 }),
        )
        .await;
    match reply.status {
        404 | 422 => {
            api.expect_error(&reply, reply.status, "transfer to an unknown account");
        }
        202 => {
            let transfer = reply.json["transfer_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no transfer_id in {}", reply.text))
                .to_owned();
            let ended = api
                .transfer_ending(
                    &transfer,
                    &["completed", "compensated", "failed"],
                    Duration::from_secs(15),
                )
                .await;
            assert!(
                ended["status"] == "compensated" || ended["status"] == "failed",
                "a transfer to an unknown account ended {ended}\n{}",
                server.log()
            );
        }
        other => panic!(
            "transfer to an unknown account: {other} {}\nserver log:\n{}",
            reply.text,
            server.log()
        ),
    }
    assert_eq!(
        api.balance(&account).await,
        500,
        "the source after the transfer to nowhere"
    );
    let last = api.movements(&account).await.last().map(movement);
    assert_eq!(
        last.map(|m| m.2),
        Some(500),
        "the statement's final balance"
    );
    let reply = api.get(&strong(&format!("/api/accounts/{unknown}"))).await;
    api.expect_error(&reply, 404, "the unknown account stays unknown");
}

/// Appends a user's sign-up straight to the store, past the HTTP edge's
/// checks (as another program sharing the database could).
async fn append_sign_up(db: &Database, user_id: &str, name: &str, email: &str) {
    use outflow::{AppendRequest, EventStore, NewEvent};
    let event = NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "UserSignedUp".into(),
        event_version: "1.0".into(),
        payload: json!({ "UserSignedUp": { "name": name, "email": email } }),
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    };
    let request = AppendRequest {
        aggregate_type: "user".into(),
        aggregate_id: user_id.into(),
        expected_version: 0,
        events: vec![event],
    };
    match db.url.strip_prefix("sqlite:") {
        Some(path) => {
            let store = outflow::SqliteStore::open(path)
                .await
                .expect("open the file");
            store.append(request).await.expect("append");
            store.close().await;
        }
        None => {
            let store = outflow::PostgresStore::connect(&db.url)
                .await
                .expect("connect");
            store.append(request).await.expect("append");
        }
    }
}

/// What a hostile client sends: amounts at the edge of `i64`, NUL bytes and
/// control characters, huge strings, wrong methods, bad path and query
/// parameters. Every answer is a JSON 4xx, the same on both backends, and
/// nothing is half-written; a sign-up the database cannot store parks one
/// event and the later ones get their e-mail.
async fn hostile_input(backend: Backend) {
    let (db, server) = start(backend, "http_hostile", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);

    // Amounts: the balance never wraps.
    let rich = api.open("Rich").await;
    api.deposit(&rich, i64::MAX).await;
    let reply = api
        .post_json(
            &format!("/api/accounts/{rich}/deposits"),
            json!({ "amount": 1 }),
        )
        .await;
    let kind = api.expect_error(&reply, 422, "a deposit past i64::MAX");
    assert_eq!(kind, "refused");
    assert_eq!(api.balance(&rich).await, i64::MAX);
    let holder = api.open("Holder").await;
    api.deposit(&holder, 1).await;
    let reply = api
        .post_json(
            "/api/transfers",
            json!({ "from": rich, "to": holder, "amount": i64::MAX }),
        )
        .await;
    let transfer = api.expect(&reply, 202, "a transfer of i64::MAX")["transfer_id"]
        .as_str()
        .expect("a transfer id")
        .to_owned();
    let ended = api
        .transfer_ending(
            &transfer,
            &["completed", "compensated", "failed"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(ended["status"], "compensated", "{ended}");
    assert_eq!(api.balance(&rich).await, i64::MAX);
    assert_eq!(api.balance(&holder).await, 1);
    for amount in [i64::MIN, -1] {
        let reply = api
            .post_json(
                &format!("/api/accounts/{holder}/withdrawals"),
                json!({ "amount": amount }),
            )
            .await;
        api.expect_error(&reply, 422, &format!("a withdrawal of {amount}"));
    }
    let reply = api
        .post_raw(
            &format!("/api/accounts/{holder}/deposits"),
            "{\"amount\": 9223372036854775808}",
        )
        .await;
    api.expect_error(&reply, 400, "an amount past i64");

    // NUL bytes and control characters: refused alike on both backends.
    let nul = "a\u{0}b";
    let reply = api.get(&format!("/api/accounts/acc%00{holder}")).await;
    api.expect_error(&reply, 400, "a NUL in an account id");
    let reply = api
        .post_json("/api/accounts/a%00b/deposits", json!({ "amount": 1 }))
        .await;
    api.expect_error(&reply, 400, "a NUL in a deposit's account id");
    let reply = api.get("/api/transfers/tr%00x").await;
    api.expect_error(&reply, 400, "a NUL in a transfer id");
    let reply = api
        .post_json(
            "/api/transfers",
            json!({ "from": nul, "to": holder, "amount": 1 }),
        )
        .await;
    api.expect_error(&reply, 400, "a NUL in a transfer's source");
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": "Nul", "email": format!("n{nul}@example.com") }),
        )
        .await;
    api.expect_error(&reply, 422, "a NUL in an e-mail");
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": nul, "email": unique_email("nul") }),
        )
        .await;
    api.expect_error(&reply, 422, "a NUL in a name");
    let reply = api
        .post_json("/api/accounts", json!({ "owner": "bell\u{7}" }))
        .await;
    api.expect_error(&reply, 422, "a control character in an owner");
    let reply = api
        .post_json("/api/accounts", json!({ "owner": "  " }))
        .await;
    api.expect_error(&reply, 422, "a blank owner");

    // Huge strings: a 60 kB e-mail is refused by the rules, a 1 MB body by
    // the size limit.
    let long = "x".repeat(60_000);
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": "Long", "email": format!("{long}@example.com") }),
        )
        .await;
    api.expect_error(&reply, 422, "a 60 kB e-mail");
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": "x".repeat(201), "email": unique_email("long") }),
        )
        .await;
    api.expect_error(&reply, 422, "a 201-character name");
    // (On a client of its own: the server answers before reading the
    // body and closes that connection.)
    let huge = "y".repeat(1 << 20);
    let once = Api::new(&server);
    let reply = once
        .post_json(
            "/api/users",
            json!({ "name": "Huge", "email": format!("{huge}@example.com") }),
        )
        .await;
    once.expect_error(&reply, 413, "a 1 MB body");
    let reply = api.get(&format!("/api/accounts/{}", "a".repeat(65))).await;
    api.expect_error(&reply, 400, "a 65-character id");

    // Wrong methods, bad query and path parameters.
    let reply = api
        .send(
            api.client.delete(server.url("/api/accounts")),
            "DELETE /api/accounts",
        )
        .await;
    api.expect_error(&reply, 405, "DELETE /api/accounts");
    let reply = api
        .send(
            api.client
                .get(server.url(&format!("/api/accounts/{holder}/deposits"))),
            "GET deposits",
        )
        .await;
    api.expect_error(&reply, 405, "GET on the deposits route");
    let reply = api
        .send(api.client.put(server.url("/api/users")), "PUT /api/users")
        .await;
    api.expect_error(&reply, 405, "PUT /api/users");
    let reply = api
        .get("/api/accounts?consistency=strong&consistency=eventual")
        .await;
    api.expect_error(&reply, 400, "a repeated query parameter");
    let reply = api.get("/api/accounts?consistency=sometimes").await;
    api.expect_error(&reply, 400, "an unknown consistency");

    // Operators' routes: authorization before anything is parsed.
    let reply = api.post_empty("/api/dead-letters/abc/retry", None).await;
    api.expect_error(&reply, 401, "a bad dead-letter id without a token");
    let reply = api
        .post_empty("/api/dead-letters/abc/discard", Some("Bearer wrong"))
        .await;
    api.expect_error(&reply, 403, "a bad dead-letter id with a wrong token");
    let authorized = format!("Bearer {TOKEN}");
    let reply = api
        .post_empty("/api/dead-letters/abc/retry", Some(&authorized))
        .await;
    api.expect_error(&reply, 400, "a non-numeric dead-letter id");
    let reply = api
        .post_empty(
            "/api/dead-letters/99999999999999999999999/discard",
            Some(&authorized),
        )
        .await;
    api.expect_error(&reply, 400, "a dead-letter id past u64");
    let reply = api
        .post_empty("/api/projections/nope/rebuild", Some(&authorized))
        .await;
    api.expect_error(&reply, 404, "an unknown projection");

    // Nothing was half-written: the accounts hold what they held, no user
    // was created by a refused sign-up.
    assert_eq!(api.balance(&holder).await, 1);
    let reply = api.get(&strong("/api/users")).await;
    let users = api.expect(&reply, 200, "the users");
    let names: Vec<&str> = users
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert!(names.is_empty(), "refused sign-ups left users: {names:?}");

    // A sign-up the database cannot store in text (written past the edge):
    // on PostgreSQL its welcome e-mail is parked as the data's fault, and
    // the next user still gets theirs; on SQLite it is sent.
    append_sign_up(&db, "user-raw-nul", "Bad\u{0}Name", &unique_email("raw")).await;
    let after = unique_email("after");
    api.sign_up("After", &after).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.emails_to(&after).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the welcome e-mail after a bad event was not sent\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if matches!(backend, Backend::Postgres) {
        let reply = api
            .send(
                api.client
                    .get(server.url("/api/dead-letters"))
                    .header(AUTHORIZATION, &authorized),
                "dead letters",
            )
            .await;
        let letters = api.expect(&reply, 200, "dead letters");
        let parked: Vec<&Value> = letters
            .as_array()
            .expect("a list")
            .iter()
            .filter(|l| l["aggregate_id"] == "user-raw-nul")
            .collect();
        assert!(
            parked.iter().any(|l| l["projection"] == "welcome_emails"),
            "the bad sign-up was not parked: {letters}"
        );
    }
}

async fn operator_endpoints(backend: Backend) {
    let (_db, server) = start(backend, "http_operator", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    let account = api.open("Operator").await;
    api.deposit(&account, 100).await;

    let projections = api.expect(&api.get("/api/projections").await, 200, "GET projections");
    let names: Vec<&str> = projections
        .as_array()
        .unwrap_or_else(|| panic!("projections: not an array: {projections}"))
        .iter()
        .filter_map(|p| p["projection"].as_str())
        .collect();
    assert!(!names.is_empty(), "no projections listed: {projections}");
    // A view projection when there is one: rebuilding it is always allowed.
    let name = names
        .iter()
        .find(|n| **n == "balances")
        .unwrap_or(&names[0]);
    let right = format!("Bearer {TOKEN}");

    for path in [
        format!("/api/projections/{name}/rebuild"),
        "/api/dead-letters/1/retry".to_owned(),
    ] {
        let reply = api.post_empty(&path, None).await;
        let kind = api.expect_error(&reply, 401, &format!("{path} without a token"));
        assert_ne!(kind, "disabled", "{path} without a token is not `disabled`");
        let reply = api.post_empty(&path, Some("Bearer wrong")).await;
        let kind = api.expect_error(&reply, 403, &format!("{path} with a wrong token"));
        assert_ne!(
            kind, "disabled",
            "{path} with a wrong token is not `disabled`"
        );
    }

    let path = format!("/api/projections/{name}/rebuild");
    let reply = api.post_empty(&path, Some(right.as_str())).await;
    assert!(
        (200..300).contains(&reply.status),
        "{path} with the token: {} {}\nserver log:\n{}",
        reply.status,
        reply.text,
        server.log()
    );
    let reply = api
        .post_empty("/api/dead-letters/1/retry", Some(right.as_str()))
        .await;
    api.expect_error(&reply, 404, "retrying an unknown dead letter");

    // The rebuilt projection catches up again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = api.get(&format!("/api/accounts/{account}")).await;
        if reply.status == 200 && reply.json["balance"] == 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the balance after the rebuild: {} {}\nserver log:\n{}",
            reply.status,
            reply.text,
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A server without OUTFLOW_ADMIN_TOKEN: disabled, whatever the token.
    let (_disabled_db, disabled) = start(backend, "http_operator_disabled", &[]).await;
    let api = Api::new(&disabled);
    for path in [
        format!("/api/projections/{name}/rebuild"),
        "/api/dead-letters/1/retry".to_owned(),
    ] {
        for authorization in [Some(right.as_str()), Some("Bearer wrong"), None] {
            let reply = api.post_empty(&path, authorization).await;
            let kind = api.expect_error(
                &reply,
                403,
                &format!("{path} ({authorization:?}) on a server without a token"),
            );
            assert_eq!(
                kind, "disabled",
                "{path} ({authorization:?}): {}",
                reply.text
            );
        }
    }
}

async fn concurrent_withdrawals(backend: Backend) {
    let (_db, server) = start(
        backend,
        "http_concurrent",
        &[("OUTFLOW_ADMIN_TOKEN", TOKEN)],
    )
    .await;
    let api = Api::new(&server);
    let account = api.open("Racer").await;
    api.deposit(&account, 1000).await;

    let path = format!("/api/accounts/{account}/withdrawals");
    let replies =
        futures::future::join_all((0..50).map(|_| api.post_json(&path, json!({ "amount": 30 }))))
            .await;
    let (mut accepted, mut refused, mut conflicts) = (0i64, 0i64, 0i64);
    for reply in &replies {
        match reply.status {
            200 => accepted += 1,
            422 => {
                api.json_error(reply, "a refused withdrawal");
                refused += 1;
            }
            409 => {
                api.json_error(reply, "a conflicting withdrawal");
                conflicts += 1;
            }
            other => panic!(
                "a concurrent withdrawal answered {other} {}\nserver log:\n{}",
                reply.text,
                server.log()
            ),
        }
    }
    let counts = format!("{accepted} accepted, {refused} refused, {conflicts} conflicts");
    assert_eq!(accepted + refused + conflicts, 50, "{counts}");
    assert!(accepted <= 33, "overdrawn: {counts}");
    // A refusal means less than 30 was left, which only 33 withdrawals do.
    if refused > 0 {
        assert_eq!(accepted, 33, "refused while money was left: {counts}");
    }

    let balance = api.balance(&account).await;
    assert_eq!(
        balance,
        1000 - 30 * accepted,
        "the final balance ({counts})"
    );
    assert!(balance >= 0, "a negative balance ({counts})");
    let movements = api.movements(&account).await;
    let withdrawals = movements
        .iter()
        .filter(|m| m["kind"] == "withdrawal")
        .count();
    assert_eq!(
        withdrawals as i64, accepted,
        "withdrawals in the statement ({counts})"
    );
    assert_eq!(
        movements.last().map(|m| movement(m).2),
        Some(balance),
        "the statement's final balance ({counts})"
    );
}

async fn strong_consistency(backend: Backend) {
    let (_db, server) = start(backend, "http_strong", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    let account = api.open("Reader").await;
    for round in 1..=20 {
        api.deposit(&account, 10).await;
        assert_eq!(
            api.balance(&account).await,
            10 * round,
            "a strong read right after deposit {round}\nserver log:\n{}",
            server.log()
        );
    }
}

async fn metrics_and_projections(backend: Backend) {
    let (_db, server) = start(backend, "http_metrics", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    // A command, so that the command counter has a series.
    let account = api.open("Counter").await;
    api.deposit(&account, 10).await;

    let reply = api.get("/metrics").await;
    api.expect(&reply, 200, "GET /metrics");
    assert!(
        reply.content_type.starts_with("text/plain"),
        "/metrics content type `{}`",
        reply.content_type
    );
    assert!(
        reply
            .text
            .lines()
            .any(|line| line.starts_with("outflow_commands_total")
                && line.contains("aggregate_type=\"account\"")
                && line.contains("outcome=\"committed\"")),
        "no committed account commands in /metrics:\n{}",
        reply.text
    );

    let projections = api.expect(&api.get("/api/projections").await, 200, "GET projections");
    let projections = projections
        .as_array()
        .unwrap_or_else(|| panic!("projections: not an array: {projections}"));
    assert!(!projections.is_empty(), "no projections listed");
    for item in projections {
        assert!(
            item["projection"].as_str().is_some_and(|p| !p.is_empty()),
            "a projection without a name: {item}"
        );
        assert!(
            item["state"].as_str().is_some_and(|s| !s.is_empty()),
            "no state: {item}"
        );
        assert!(item["lag_events"].is_u64(), "no lag_events: {item}");
        let fields = item.as_object().expect("a projection is an object");
        for key in ["partition", "position", "held_back_by", "last_error"] {
            assert!(fields.contains_key(key), "no `{key}` in {item}");
        }
    }
}

async fn graceful_shutdown(backend: Backend) {
    let (_db, mut server) =
        start(backend, "http_shutdown", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    let account = api.open("Leaver").await;
    api.deposit(&account, 10).await;

    // A live feed held open must not keep the server from stopping.
    let feed = api
        .client
        .get(server.url("/api/events"))
        .header(ACCEPT, "text/event-stream")
        .send()
        .await
        .expect("open the live feed");
    assert_eq!(feed.status().as_u16(), 200, "the live feed");
    let client = api.client.clone();
    let url = server.url("/api/accounts");
    drop(api);

    let stopped = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(10)));
    assert!(
        stopped,
        "the server did not exit cleanly within 10 s of SIGTERM\nserver log:\n{}",
        server.log()
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), feed.bytes()).await;
    assert!(
        ended.is_ok(),
        "the live feed stayed open after the server stopped"
    );
    assert!(
        client.get(&url).send().await.is_err(),
        "the server still answers after stopping"
    );
}
