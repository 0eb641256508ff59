//! Runs the outbox chapter's code against the test suite's PostgreSQL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outflow::outbox::Outbox;
use outflow::sqlx::postgres::PgConnectOptions;
use outflow::sqlx::{self, ConnectOptions};
use outflow::{CancellationToken, PostgresStore};
use outflow_book_examples::outbox::{deliver, sign_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_user_is_announced_and_a_rolled_back_one_is_not() {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the tests with scripts/test.sh");
    let admin: PgConnectOptions = url.parse().expect("DATABASE_URL is a URL");
    let name = format!("t_book_outbox_{}", std::process::id());
    let mut conn = admin.connect().await.expect("connect");
    for sql in [
        format!("DROP DATABASE IF EXISTS \"{name}\""),
        format!("CREATE DATABASE \"{name}\""),
    ] {
        sqlx::query(&sql)
            .execute(&mut conn)
            .await
            .expect("database");
    }
    let url = admin.database(&name).to_url_lossy().to_string();
    let store = PostgresStore::connect(&url).await.expect("store");
    sqlx::query("CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL)")
        .execute(store.pool())
        .await
        .expect("users");
    let outbox = Outbox::new(&store).await.expect("outbox");

    sign_up(&store, &outbox, 42, "ann@example.com")
        .await
        .expect("sign up");
    // The same id again: the insert fails, the transaction rolls back, and
    // its message never exists.
    assert!(sign_up(&store, &outbox, 42, "again@example.com")
        .await
        .is_err());

    let delivered = Arc::new(Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn({
        let (outbox, delivered, shutdown) = (outbox.clone(), delivered.clone(), shutdown.clone());
        async move { deliver(&outbox, delivered, shutdown).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while delivered.lock().expect("list").is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Time for a wrongly delivered second message to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    relay.await.expect("joined").expect("relay");
    let delivered = delivered.lock().expect("list").clone();
    assert_eq!(delivered, [r#"users.signed_up {"id":42}"#], "{delivered:?}");
}
