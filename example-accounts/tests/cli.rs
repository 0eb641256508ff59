//! The operator's commands against a database the demo filled, on both
//! backends: `projections status`, `rebuild NAME` (the read model is the
//! same afterwards), `dead-letters`, `retry ID`, and clear errors for an
//! unknown projection or dead letter.

mod common;

use std::process::{Command, Output};

use common::{Backend, Database};

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
