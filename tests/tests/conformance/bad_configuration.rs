//! Configuration a user gets wrong fails at start-up with a clear, typed
//! error, and soon — never a hang: an unreachable server, an unknown role,
//! a database that does not exist, a SQLite file in a directory that does
//! not exist or that is not a database.

use outflow_tests as common;

use std::time::Duration;

use outflow::{ErrorKind, PostgresStore, SqliteStore, StoreError};

/// Fails the test when `future` takes longer than 10 s (a pool retrying
/// until its acquire timeout would take 30).
async fn soon<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting after 10 s"))
}

fn database_error(error: &StoreError) -> ErrorKind {
    match error {
        StoreError::Database { kind, .. } => *kind,
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_server_fails_at_once() {
    // A port on loopback that nothing listens on: connections are refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    let error = soon(
        "connect",
        PostgresStore::connect(&format!("postgres://outflow@127.0.0.1:{port}/postgres")),
    )
    .await
    .expect_err("nothing listens there");
    assert_eq!(database_error(&error), ErrorKind::Transient, "{error:?}");
    let text = outflow::error::error_chain(&error);
    assert!(
        text.contains("connecting to PostgreSQL") && text.contains("refused"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unknown_role_or_database_is_the_infrastructures_fault() {
    let server = common::server_url();
    let (base, query) = server.split_once('?').unwrap_or((server.as_str(), ""));
    let (prefix, rest) = base.split_once("://").expect("a URL");
    let host_and_path = rest.split_once('@').map_or(rest, |(_, host)| host);
    let host = host_and_path
        .split_once('/')
        .map_or(host_and_path, |(h, _)| h);
    for (url, what) in [
        (
            format!("{prefix}://nobody_here@{host}/postgres?{query}"),
            "role",
        ),
        (
            format!("{prefix}://outflow@{host}/no_such_database?{query}"),
            "database",
        ),
    ] {
        let error = soon(what, PostgresStore::connect(&url))
            .await
            .expect_err("refused by the server");
        assert_eq!(
            database_error(&error),
            ErrorKind::Infrastructure,
            "{what}: {error:?}"
        );
        let text = outflow::error::error_chain(&error);
        assert!(text.contains("does not exist"), "{what}: {text}");
    }
}

#[tokio::test]
async fn a_sqlite_path_that_cannot_be_a_database_fails_clearly() {
    let dir = common::TestDir::new("bad_sqlite_path");
    let missing = dir.file("no/such/dir/app.db");
    let error = soon("open", SqliteStore::open(&missing))
        .await
        .expect_err("the directory does not exist");
    assert_eq!(
        database_error(&error),
        ErrorKind::Infrastructure,
        "{error:?}"
    );
    assert!(
        outflow::error::error_chain(&error).contains("opening the SQLite file"),
        "{error:?}"
    );

    let not_a_database = dir.file("notes.txt");
    std::fs::write(
        &not_a_database,
        "this is not a database, just some text ".repeat(200),
    )
    .expect("write a text file");
    let error = soon("open", SqliteStore::open(&not_a_database))
        .await
        .expect_err("not a database");
    assert_eq!(
        database_error(&error),
        ErrorKind::Infrastructure,
        "{error:?}"
    );
}
