//! The workspace's `outflow` command operating the example from a shell
//! while `serve` runs on the same database (day two, an operator in another
//! process): `outflow rebuild URL balances` is carried out by the serving
//! node, returns once done, twice in a row, and the server's strong reads
//! give every balance; `outflow status` shows the server's units; and with
//! no server running, the rebuild is refused and exits non-zero.
//!
//! The `outflow` binary is the `outflow-cli` crate's: `cargo test
//! --workspace` builds it beside this crate's binary.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::client::{balance, client, deposit, open_with};
use common::{Backend, Database, Server};

fn outflow_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_example-accounts")).with_file_name("outflow");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p outflow-cli` (`cargo test --workspace` does)",
        path.display()
    );
    path
}

fn outflow(args: &[&str]) -> Output {
    Command::new(outflow_binary())
        .args(args)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run outflow")
}

async fn rebuild_while_serving(backend: Backend) {
    let db = Database::new(backend, "outflow_live").await;
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
    let status = outflow(&["status", &db.url, "--json"]);
    assert!(
        status.status.success(),
        "outflow status: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("\"balances\""),
        "outflow status lists the server's projections: {}",
        String::from_utf8_lossy(&status.stdout)
    );
    for round in 0..2 {
        let url = db.url.clone();
        let rebuilt = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::task::spawn_blocking(move || outflow(&["rebuild", &url, "balances"])),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "round {round}: outflow rebuild did not return within 120 s\n{}",
                server.log()
            )
        })
        .expect("the rebuild's thread");
        assert!(
            rebuilt.status.success(),
            "round {round}: exit {:?}\n{}\n{}\n{}",
            rebuilt.status,
            String::from_utf8_lossy(&rebuilt.stdout),
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
    assert!(server.terminate(Duration::from_secs(30)));

    // No node runs the projection now: refused, non-zero, and said why.
    let refused = outflow(&["rebuild", &db.url, "balances"]);
    assert!(!refused.status.success(), "a rebuild with no node running");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("no node"), "why it was refused: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outflow_rebuilds_while_the_example_serves_on_sqlite() {
    rebuild_while_serving(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outflow_rebuilds_while_the_example_serves_on_postgres() {
    rebuild_while_serving(Backend::Postgres).await;
}
