//! TLS to PostgreSQL: the test server (started by `scripts/test.sh`) accepts
//! TLS with a self-signed certificate, whose path is in `OUTFLOW_PG_TLS_CA`.
//! Outflow connects with `sslmode=require` (encrypted, as most hosted
//! PostgreSQL demands) and with `verify-full` against that certificate, and
//! works over the connection.

use outflow_tests as common;

use outflow::{AppendRequest, EventStore, NewEvent, PostgresStore};
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

fn ca_path() -> String {
    std::env::var("OUTFLOW_PG_TLS_CA").expect(
        "OUTFLOW_PG_TLS_CA is not set: run the tests with scripts/test.sh, which starts \
         PostgreSQL with a TLS certificate",
    )
}

async fn uses_tls(store: &PostgresStore) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .expect("read pg_stat_ssl")
}

async fn append_and_read(store: &PostgresStore) {
    store
        .append(AppendRequest {
            aggregate_type: "wallet".into(),
            aggregate_id: "w".into(),
            expected_version: 0,
            events: vec![NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "Credited".into(),
                event_version: "1".into(),
                payload: serde_json::json!({ "amount": 1 }),
                metadata: Default::default(),
                correlation_id: None,
                causation_id: None,
            }],
        })
        .await
        .expect("append over TLS");
    let events = store
        .read_stream("wallet", "w", 0, 10)
        .await
        .expect("read over TLS");
    assert_eq!(events.len(), 1);
}

/// The test database's URL with `sslmode` (and more) set.
fn url_with(db: &common::TestDb, params: &str) -> String {
    let server = common::server_url();
    let base = server.split_once('?').map_or(server.as_str(), |(b, _)| b);
    let root = base.rsplit_once('/').map_or(base, |(root, _)| root);
    format!("{root}/{}?{params}", db.name)
}

#[tokio::test]
async fn a_url_with_sslmode_require_connects_over_tls() {
    let db = common::TestDb::new("tls_require").await;
    let url = url_with(&db, "sslmode=require");
    let store = PostgresStore::connect(&url)
        .await
        .expect("connect with sslmode=require");
    assert!(uses_tls(&store).await, "the connection is not encrypted");
    append_and_read(&store).await;
}

#[tokio::test]
async fn verify_full_accepts_the_servers_certificate_and_refuses_an_untrusted_one() {
    let db = common::TestDb::new("tls_verify").await;
    let url = url_with(
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", ca_path()),
    );
    let options: PgConnectOptions = url.parse().expect("URL");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.clone())
        .await
        .expect("connect with verify-full");
    let store = PostgresStore::builder(pool)
        .build()
        .await
        .expect("store over TLS");
    assert!(uses_tls(&store).await);
    append_and_read(&store).await;

    // A server certificate that no trusted root signed is refused.
    let untrusted = options.ssl_root_cert_from_pem(Vec::new());
    let refused = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(untrusted)
        .await;
    assert!(
        refused.is_err(),
        "verify-full accepted a certificate without a trusted root"
    );
}
