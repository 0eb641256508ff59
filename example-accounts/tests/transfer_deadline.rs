//! The transfer deadline, end to end on both backends: a transfer whose
//! process is stuck past its deadline times out and is refunded, and a
//! server SIGKILLed at each step of a transfer around its deadline — the
//! credit and the timeout racing at the transfer — finishes every transfer
//! exactly once, one way or the other, with no money created or lost.

mod common;

use std::time::Duration;

use common::client::{balance, client, ended, get, movements, open_with, post};
use common::{Backend, Database, Server};
use serde_json::json;

/// A server with `timeout` as the transfer deadline, halting at `point`
/// (none when empty).
fn start(db: &Database, timeout: &str, point: &str) -> Server {
    let mut env = vec![("OUTFLOW_TRANSFER_TIMEOUT", timeout)];
    if !point.is_empty() {
        env.push(("EXAMPLE_ACCOUNTS_HALT_AT", point));
    }
    Server::start(&db.url, &env)
}

async fn request(client: &reqwest::Client, server: &Server, from: &str, to: &str) -> String {
    let transfer = post(
        client,
        server,
        "/api/transfers",
        json!({ "from": from, "to": to, "amount": 300 }),
    )
    .await;
    transfer["transfer_id"]
        .as_str()
        .expect("a transfer id")
        .to_owned()
}

/// Waits until the transfer's status (as the `transfers` view shows it) is
/// `wanted`.
async fn wait_status(client: &reqwest::Client, server: &Server, transfer: &str, wanted: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(client, server, &format!("/api/transfers/{transfer}")).await;
        if status == 200 && body["status"] == wanted {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "transfer {transfer} never became {wanted}: {body}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process halts before the credit; the deadline passes meanwhile and
/// the transfer times out. Killed then, and again at a step of the refund,
/// and restarted, the process finds the credit refused to start and
/// refunds once: the source gets its money back, the target never sees it.
async fn times_out_and_refunds(backend: Backend) {
    let db = Database::new(backend, "deadline_refund").await;
    let client = client();
    for point in ["after:refund", "done:refund", "after:compensate"] {
        let mut first = start(&db, "1s", "before:credit");
        let source = open_with(&client, &first, "Ann", 1_000).await;
        let target = open_with(&client, &first, "Bob", 500).await;
        let transfer = request(&client, &first, &source, &target).await;
        assert!(
            first.wait_for_output(
                &format!("halted at before:credit of transfer {transfer}"),
                Duration::from_secs(60)
            ),
            "the process did not reach the credit\n{}",
            first.log()
        );
        // The scheduler runs beside the stuck step: the deadline fires.
        wait_status(&client, &first, &transfer, "compensating").await;
        first.kill();

        let mut second = start(&db, "1s", point);
        assert!(
            second.wait_for_output(
                &format!("halted at {point} of transfer {transfer}"),
                Duration::from_secs(60)
            ),
            "the refund did not reach {point}\n{}",
            second.log()
        );
        second.kill();

        let mut third = start(&db, "1s", "");
        assert_eq!(
            ended(&client, &third, &transfer).await,
            "compensated",
            "{point}"
        );
        assert_eq!(balance(&client, &third, &source).await, 1_000, "{point}");
        assert_eq!(balance(&client, &third, &target).await, 500, "{point}");
        assert_eq!(
            movements(&client, &third, &source).await,
            ["deposit", "transfer out", "refund"],
            "{point}"
        );
        assert_eq!(
            movements(&client, &third, &target).await,
            ["deposit"],
            "{point}"
        );
        let (_, status) = get(&client, &third, &format!("/api/transfers/{transfer}")).await;
        assert_eq!(status["reason"], "not completed in time", "{status}");
        assert!(third.terminate(Duration::from_secs(30)), "{}", third.log());
    }
}

/// Killed at each point of a transfer whose deadline is as short as the
/// steps, restarted at once: the credit and the timeout race; whichever the
/// transfer accepted first decides, and the books agree with it.
async fn finishes_once_around_the_deadline(backend: Backend) {
    let db = Database::new(backend, "deadline_race").await;
    let client = client();
    let mut outcomes = Vec::new();
    for point in [
        "before:debit",
        "done:debit",
        "before:credit",
        "after:credit",
        "done:credit",
        "before:complete",
    ] {
        let mut first = start(&db, "1s", point);
        let source = open_with(&client, &first, "Ann", 1_000).await;
        let target = open_with(&client, &first, "Bob", 500).await;
        let transfer = request(&client, &first, &source, &target).await;
        assert!(
            first.wait_for_output(
                &format!("halted at {point} of transfer {transfer}"),
                Duration::from_secs(60),
            ),
            "the process did not reach {point}\n{}",
            first.log()
        );
        first.kill();

        let mut second = start(&db, "1s", "");
        let end = ended(&client, &second, &transfer).await;
        let books = (
            balance(&client, &second, &source).await,
            balance(&client, &second, &target).await,
        );
        let lines = (
            movements(&client, &second, &source).await,
            movements(&client, &second, &target).await,
        );
        match end.as_str() {
            "completed" => {
                assert_eq!(books, (700, 800), "{point}");
                assert_eq!(lines.0, ["deposit", "transfer out"], "{point}");
                assert_eq!(lines.1, ["deposit", "transfer in"], "{point}");
            }
            "compensated" => {
                assert_eq!(books, (1_000, 500), "{point}");
                assert_eq!(lines.0, ["deposit", "transfer out", "refund"], "{point}");
                assert_eq!(lines.1, ["deposit"], "{point}");
            }
            other => panic!("{point}: the transfer ended {other}\n{}", second.log()),
        }
        outcomes.push((point, end));
        assert!(
            second.terminate(Duration::from_secs(30)),
            "{}",
            second.log()
        );
    }
    eprintln!("outcomes: {outcomes:?}");
}

const TOKEN: &str = "deadline-operator";

/// The console's view of the timers, as an operator.
async fn console_timers(
    client: &reqwest::Client,
    server: &Server,
    state: &str,
) -> serde_json::Value {
    let response = client
        .get(format!("{}/admin/api/timers?state={state}", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("the console answers");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON")
}

/// Without a crash and within its deadline, a transfer completes and its
/// deadline is cancelled, as the console shows; a stuck one's deadline
/// fires, and the console shows it fired.
async fn the_console_shows_deadlines(backend: Backend) {
    let db = Database::new(backend, "deadline_console").await;
    let client = client();
    let server = Server::start(
        &db.url,
        &[
            ("OUTFLOW_TRANSFER_TIMEOUT", "1h"),
            ("OUTFLOW_ADMIN_TOKEN", TOKEN),
        ],
    );
    let source = open_with(&client, &server, "Ann", 1_000).await;
    let target = open_with(&client, &server, "Bob", 500).await;
    let transfer = request(&client, &server, &source, &target).await;
    assert_eq!(ended(&client, &server, &transfer).await, "completed");
    let key = format!("transfer/{transfer}/deadline");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let cancelled = console_timers(&client, &server, "cancelled").await;
        let found = cancelled["timers"]
            .as_array()
            .is_some_and(|timers| timers.iter().any(|t| t["key"] == key.as_str()));
        // The counts are read beside the list: wait for both to agree.
        if found && cancelled["counts"]["pending"] == 0 {
            assert!(
                cancelled["scheduler"]
                    .as_str()
                    .is_some_and(|node| node.ends_with(":timers")),
                "a node fires the timers: {cancelled}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deadline was not cancelled: {cancelled}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An operator's cancel of a timer that is no longer pending, a retry of
    // one that was never refused, and a request without a key: refused,
    // typed.
    for (path, status, error) in [
        (format!("cancel?key={key}"), 404, "unknown_timer"),
        (format!("retry?key={key}"), 404, "unknown_timer"),
        ("cancel".to_owned(), 400, "bad_query"),
    ] {
        let response = client
            .post(format!("{}/admin/api/timers/{path}", server.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), status, "{path}");
        let body: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(body["error"], error, "{path}: {body}");
    }
    // Without a token the console refuses.
    let response = client
        .get(format!("{}/admin/api/timers", server.base))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 401);
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
    times_out_and_refunds: times_out_and_refunds_on_sqlite, times_out_and_refunds_on_postgres;
    finishes_once_around_the_deadline: around_the_deadline_on_sqlite, around_the_deadline_on_postgres;
    the_console_shows_deadlines: console_deadlines_on_sqlite, console_deadlines_on_postgres;
}
