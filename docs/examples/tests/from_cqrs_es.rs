//! Runs the "coming from cqrs-es" chapter's two versions of one application,
//! each on a fresh database of the server `scripts/test.sh` starts.

use std::sync::Arc;

use outflow::sqlx::postgres::PgConnectOptions;
use outflow::sqlx::{self, ConnectOptions};
use outflow::view::ViewProjection;
use outflow::PostgresStore;
use outflow_book_examples::from_cqrs_es::{after, before, Audit};
use outflow_book_examples::quickstart::{Cart, CartSummary};

/// A new empty database; the test fails when there is no server.
async fn fresh_database(label: &str) -> String {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the tests with scripts/test.sh");
    let admin: PgConnectOptions = url.parse().expect("DATABASE_URL is a URL");
    let name = format!("t_book_{label}_{}", std::process::id());
    let mut conn = admin.connect().await.expect("connect to the test server");
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("drop");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("create");
    admin.database(&name).to_url_lossy().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_application_on_postgres_es_and_on_outflow() {
    // postgres-es: its tables (Outflow's schema is a superset), the view's.
    let url = fresh_database("before").await;
    let store = PostgresStore::connect(&url).await.expect("schema");
    ViewProjection::<Cart, CartSummary>::new("cart_summaries", "cart_summaries")
        .expect("a view")
        .create_table(store.pool())
        .await
        .expect("the view's table");
    let audit = Arc::new(Audit::default());
    let summary = before(store.pool().clone(), audit.clone())
        .await
        .expect("postgres-es")
        .expect("a summary");
    assert_eq!(summary.items, 1);
    assert_eq!(audit.lines.lock().expect("lines").as_slice(), ["cart-1 #1"]);

    let url = fresh_database("after").await;
    let store = PostgresStore::connect(&url).await.expect("store");
    let audit = Arc::new(Audit::default());
    let summary = after(store, audit.clone())
        .await
        .expect("outflow")
        .expect("a summary");
    assert_eq!(summary.items, 1);
    assert_eq!(audit.lines.lock().expect("lines").as_slice(), ["cart-1 #1"]);
}
