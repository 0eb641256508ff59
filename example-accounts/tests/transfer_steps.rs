//! A server SIGKILLed at every step of a transfer — before a step sends
//! anything, after its command was answered but before its follow-up, and
//! after everything was sent but before the process's batch committed —
//! finishes the transfer after a restart the way the first decisions said,
//! on SQLite and PostgreSQL: the money is neither created nor destroyed, a
//! `failed` transfer moves nothing, and each step's money moves once.
//!
//! The refused debit is the hard case: between the kill and the replay the
//! source is funded (by a server that halts before the debit), so a replay
//! that ran the debit again would now take the money — it must return the
//! remembered refusal instead.

mod common;

use std::time::Duration;

use common::client::{balance, client, deposit, ended, get, movements, open_with, post};
use common::{Backend, Database, Server};
use serde_json::json;

/// Waits until every projection has handled every event, so that the next
/// server does not replay this scenario's last batch (and halt in it).
async fn settled(client: &reqwest::Client, server: &mut Server) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(client, server, "/api/projections").await;
        let idle = status == 200
            && body
                .as_array()
                .is_some_and(|units| units.iter().all(|u| u["lag_events"] == 0));
        if idle {
            // A clean stop releases the leases for the next server.
            assert!(
                server.terminate(Duration::from_secs(30)),
                "{}",
                server.log()
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the projections did not catch up: {body}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn halting_at(point: &str) -> [(&'static str, String); 1] {
    [("EXAMPLE_ACCOUNTS_HALT_AT", point.to_owned())]
}

fn start(db: &Database, env: &[(&'static str, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(&db.url, &env)
}

/// Requests a transfer on a server halting at `point`, waits for the halt,
/// SIGKILLs it; returns the transfer id.
async fn transfer_until_halt(
    client: &reqwest::Client,
    server: &mut Server,
    from: &str,
    to: &str,
    amount: i64,
    point: &str,
) -> String {
    let transfer = post(
        client,
        server,
        "/api/transfers",
        json!({ "from": from, "to": to, "amount": amount }),
    )
    .await;
    let transfer = transfer["transfer_id"]
        .as_str()
        .expect("a transfer id")
        .to_owned();
    assert!(
        server.wait_for_output(
            &format!("halted at {point} of transfer {transfer}"),
            Duration::from_secs(60)
        ),
        "the process did not reach {point}\n{}",
        server.log()
    );
    server.kill();
    transfer
}

/// The debit is accepted and the credit too: killed at each point of each
/// step, the transfer completes, each account moved once.
async fn completes_whatever_the_crash(backend: Backend) {
    let db = Database::new(backend, "steps_completed").await;
    let client = client();
    for point in [
        "before:debit",
        "after:debit",
        "done:debit",
        "before:credit",
        "after:credit",
        "done:credit",
        "before:complete",
        "after:complete",
        "done:complete",
    ] {
        let mut first = start(&db, &halting_at(point));
        let source = open_with(&client, &first, "Ann", 1_000).await;
        let target = open_with(&client, &first, "Bob", 500).await;
        let transfer = transfer_until_halt(&client, &mut first, &source, &target, 300, point).await;
        let mut second = start(&db, &[]);
        assert_eq!(
            ended(&client, &second, &transfer).await,
            "completed",
            "{point}"
        );
        let (a, b) = (
            balance(&client, &second, &source).await,
            balance(&client, &second, &target).await,
        );
        assert_eq!((a, b), (700, 800), "{point}: {}", second.log());
        assert_eq!(
            movements(&client, &second, &source).await,
            ["deposit", "transfer out"],
            "{point}"
        );
        assert_eq!(
            movements(&client, &second, &target).await,
            ["deposit", "transfer in"],
            "{point}"
        );
        settled(&client, &mut second).await;
    }
}

/// The debit is refused (too little money); the source is funded after the
/// kill and before the replay. Killed before the debit was decided, the
/// replay decides afresh (and completes); killed after the refusal, the
/// replay gets the same refusal and the transfer fails with nothing moved.
async fn a_refused_debit_stays_refused(backend: Backend) {
    let db = Database::new(backend, "steps_refused").await;
    let client = client();
    for (point, expected) in [
        ("before:debit", "completed"),
        ("after:debit", "failed"),
        ("done:debit", "failed"),
    ] {
        let mut first = start(&db, &halting_at(point));
        let source = open_with(&client, &first, "Cy", 100).await;
        let target = open_with(&client, &first, "Di", 500).await;
        let transfer = transfer_until_halt(&client, &mut first, &source, &target, 300, point).await;
        // The replay halts before its debit while the source is funded.
        let mut funding = start(&db, &halting_at("before:debit"));
        deposit(&client, &funding, &source, 1_000).await;
        assert_eq!(balance(&client, &funding, &source).await, 1_100);
        assert!(
            funding.wait_for_output(
                &format!("halted at before:debit of transfer {transfer}"),
                Duration::from_secs(60)
            ),
            "the replay did not reach the debit\n{}",
            funding.log()
        );
        funding.kill();
        let mut last = start(&db, &[]);
        assert_eq!(
            ended(&client, &last, &transfer).await,
            expected,
            "{point}: {}",
            last.log()
        );
        let (a, b) = (
            balance(&client, &last, &source).await,
            balance(&client, &last, &target).await,
        );
        assert_eq!(a + b, 1_600, "{point}: money created or destroyed");
        if expected == "failed" {
            assert_eq!(
                (a, b),
                (1_100, 500),
                "{point}: a failed transfer moved money"
            );
            assert_eq!(
                movements(&client, &last, &source).await,
                ["deposit", "deposit"],
                "{point}"
            );
        } else {
            assert_eq!((a, b), (800, 800), "{point}");
        }
        settled(&client, &mut last).await;
    }
}

/// The credit is refused (the target is closed): killed at each point of
/// the credit, the refund and the compensation, the transfer ends
/// compensated with exactly one refund.
async fn compensates_once_whatever_the_crash(backend: Backend) {
    let db = Database::new(backend, "steps_compensated").await;
    let client = client();
    for point in [
        "before:credit",
        "after:credit",
        "done:credit",
        "before:refund",
        "after:refund",
        "done:refund",
        "before:compensate",
        "after:compensate",
        "done:compensate",
    ] {
        let mut first = start(&db, &halting_at(point));
        let source = open_with(&client, &first, "Ed", 1_000).await;
        let target = open_with(&client, &first, "Flo", 0).await;
        post(
            &client,
            &first,
            &format!("/api/accounts/{target}/close"),
            json!({}),
        )
        .await;
        let transfer = transfer_until_halt(&client, &mut first, &source, &target, 400, point).await;
        let mut second = start(&db, &[]);
        assert_eq!(
            ended(&client, &second, &transfer).await,
            "compensated",
            "{point}"
        );
        assert_eq!(balance(&client, &second, &source).await, 1_000, "{point}");
        assert_eq!(balance(&client, &second, &target).await, 0, "{point}");
        assert_eq!(
            movements(&client, &second, &source).await,
            ["deposit", "transfer out", "refund"],
            "{point}"
        );
        settled(&client, &mut second).await;
    }
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
    completes_whatever_the_crash: completed_steps_on_sqlite, completed_steps_on_postgres;
    a_refused_debit_stays_refused: refused_debit_on_sqlite, refused_debit_on_postgres;
    compensates_once_whatever_the_crash: compensated_steps_on_sqlite, compensated_steps_on_postgres;
}
