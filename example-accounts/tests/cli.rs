//! The operator's commands against a database the demo filled, on both
//! backends: `projections status`, `rebuild NAME` (the read model is the
//! same afterwards), `dead-letters`, `retry ID`, and clear errors for an
//! unknown projection or dead letter; and a rebuild from the CLI while the
//! server runs on the same database (day two: the CLI returns, and the
//! server's strong reads answer the complete read model).

mod common;

use std::process::{Command, Output};

use common::client::{balance, client, deposit, open_with};
use common::{Backend, Database, Server};

fn run(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_example-accounts"))
        .env_remove("DATABASE_URL")
        .args(["--database-url", url])
        .args(args)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run the example application")
}

fn ok(url: &str, args: &[&str]) -> String {
    let output = run(url, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{args:?}: exit {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn fails(url: &str, args: &[&str], expected: &str) {
    let output = run(url, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert!(
        stderr.contains(expected),
        "{args:?}: missing `{expected}` in\n{stderr}"
    );
}

/// The balances section of the demo's output.
fn balances(demo: &str) -> String {
    let start = demo.find("Balances (projection").expect("a balances table");
    let end = demo[start..].find("\n\n").map_or(demo.len(), |e| start + e);
    demo[start..end].to_owned()
}

/// The balances table as (account, view JSON), read directly.
async fn balances_table(backend: Backend, url: &str) -> Vec<(String, String)> {
    use outflow::sqlx;
    match backend {
        Backend::Sqlite => {
            let path = url.trim_start_matches("sqlite:");
            let pool = sqlx::SqlitePool::connect_with(
                sqlx::sqlite::SqliteConnectOptions::new().filename(path),
            )
            .await
            .expect("open the file");
            let rows = sqlx::query_as("SELECT view_id, payload FROM balances ORDER BY view_id")
                .fetch_all(&pool)
                .await
                .expect("read balances");
            pool.close().await;
            rows
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.expect("connect");
            let rows =
                sqlx::query_as("SELECT view_id, payload::text FROM balances ORDER BY view_id")
                    .fetch_all(&pool)
                    .await
                    .expect("read balances");
            pool.close().await;
            rows
        }
    }
}

async fn operates(backend: Backend) {
    let db = Database::new(backend, "cli").await;
    let url = db.url.clone();
    let before = tokio::task::spawn_blocking({
        let url = url.clone();
        move || ok(&url, &["demo"])
    })
    .await
    .expect("the demo's thread");
    let table = balances_table(backend, &url).await;
    assert_eq!(table.len(), 3, "{table:?}");
    let rebuilt = tokio::task::spawn_blocking({
        let url = url.clone();
        move || ok(&url, &["projections", "rebuild", "balances"])
    })
    .await
    .expect("the rebuild's thread");
    assert_eq!(balances_table(backend, &url).await, table, "{rebuilt}");
    tokio::task::spawn_blocking(move || {
        let demo = before;
        let status = ok(&url, &["projections", "status"]);
        assert_eq!(status.lines().count(), 7, "{status}");
        for name in [
            "balances",
            "statements",
            "users",
            "transfers",
            "welcome_emails",
            "transfer_process",
        ] {
            assert!(status.contains(name), "{name} missing in\n{status}");
        }

        assert!(ok(&url, &["projections", "dead-letters"]).contains("no parked events"));
        fails(
            &url,
            &["projections", "retry", "999999"],
            "no dead letter #999999",
        );
        fails(
            &url,
            &["projections", "rebuild", "nope"],
            "no projection `nope`",
        );

        // A second demo on the same database: its balances read the same.
        let second = ok(&url, &["demo"]);
        let strip = |table: String| {
            table
                .lines()
                .map(|line| {
                    line.split_whitespace()
                        .skip(1)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(balances(&demo)), strip(balances(&second)));
    })
    .await
    .expect("the commands' thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_sqlite() {
    operates(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_postgres() {
    operates(Backend::Postgres).await;
}

/// `projections rebuild balances` in a second process while `serve` runs:
/// the CLI returns (its runner joins, takes its share, and leaves), and the
/// server's strong reads give every balance, twice in a row.
async fn rebuild_while_serving(backend: Backend) {
    let db = Database::new(backend, "cli_live").await;
    let mut server = Server::start(&db.url, &[]);
    let http = client();
    let mut accounts = Vec::new();
    for i in 0..8i64 {
        let id = open_with(&http, &server, &format!("Owner {i}"), 100 + i).await;
        deposit(&http, &server, &id, 5).await;
        accounts.push((id, 105 + i));
    }
    for (id, expected) in &accounts {
        assert_eq!(balance(&http, &server, id).await, *expected);
    }
    for round in 0..2 {
        let url = db.url.clone();
        let rebuilt = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            tokio::task::spawn_blocking(move || run(&url, &["projections", "rebuild", "balances"])),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "round {round}: the CLI's rebuild did not return within 120 s\n{}",
                server.log()
            )
        })
        .expect("the rebuild's thread");
        assert!(
            rebuilt.status.success(),
            "round {round}: exit {:?}\n{}\n{}",
            rebuilt.status,
            String::from_utf8_lossy(&rebuilt.stderr),
            server.log()
        );
        for (id, expected) in &accounts {
            assert_eq!(
                balance(&http, &server, id).await,
                *expected,
                "round {round}: {id} after the rebuild"
            );
        }
    }
    // The server still works every unit: a new deposit shows.
    deposit(&http, &server, &accounts[0].0, 1).await;
    assert_eq!(
        balance(&http, &server, &accounts[0].0).await,
        accounts[0].1 + 1
    );
    assert!(server.terminate(std::time::Duration::from_secs(30)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_while_serving_on_sqlite() {
    rebuild_while_serving(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_while_serving_on_postgres() {
    rebuild_while_serving(Backend::Postgres).await;
}
