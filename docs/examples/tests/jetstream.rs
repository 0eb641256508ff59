//! Runs the JetStream event store chapter's code against the test suite's
//! 3-node JetStream cluster (`NATS_CLUSTER_URL`) and PostgreSQL
//! (`DATABASE_URL`): the store opened with the chapter's settings, the shop
//! with its read model in PostgreSQL, a command sent once, and the
//! application before and after the move. Only `open` is not run (it names
//! the chapter's example hosts); the test opens the same store on the
//! suite's cluster.
#![cfg(feature = "nats")]

use std::time::Duration;

use outflow::sqlx::postgres::PgConnectOptions;
use outflow::sqlx::{self, ConnectOptions};
use outflow::store::jetstream::JetStreamStore;
use outflow_book_examples::jetstream::{add_item_once, on_jetstream, on_postgres, shop};
use outflow_book_examples::quickstart::CartCommand;

/// A fresh database on the suite's server.
async fn database(label: &str) -> String {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the tests with scripts/test.sh");
    let admin: PgConnectOptions = url.parse().expect("DATABASE_URL is a URL");
    let name = format!("t_book_jetstream_{label}_{}", std::process::id());
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
    admin.database(&name).to_url_lossy().to_string()
}

/// The chapter's store (4 partitions, 3 replicas, a 15 s timeout) on the
/// suite's cluster, under a prefix of its own.
async fn store(label: &str) -> JetStreamStore {
    let urls = std::env::var("NATS_CLUSTER_URL").expect(
        "NATS_CLUSTER_URL is not set: run the tests with scripts/test.sh, which starts a cluster",
    );
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(urls.split(',').map(str::to_owned).collect::<Vec<_>>())
        .await
        .expect("connect to the cluster");
    JetStreamStore::builder(client)
        .prefix(format!("book_{label}_{}", std::process::id()))
        .partitions(4)
        .replicas(3)
        .timeout(Duration::from_secs(15))
        .build()
        .await
        .expect("the store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_on_jetstream_with_its_read_model_in_postgres() {
    let events = store("shop").await;
    assert_eq!(events.partitions(), 4);
    let url = database("shop").await;
    let items = shop(events.clone(), &url).await.expect("the shop runs");
    assert_eq!(items, 1, "cart-1 holds the item the command added");

    let carts = outflow::CommandBus::new(events.clone(), ());
    let first = add_item_once(&carts, "cart-2", "tea").await.expect("added");
    assert!(!first.repeated);
    assert_eq!(first.version, 1);
    let (_, version) = carts.load("cart-2").await.expect("load");
    assert_eq!(version, 1, "added once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_before_and_after_the_move() {
    let url = database("move").await;
    let before = on_postgres(&url).await.expect("on PostgreSQL");
    before
        .carts
        .execute("cart-1", CartCommand::AddItem { item: "tea".into() })
        .await
        .expect("a command on PostgreSQL");
    let after = on_jetstream(&url, store("move").await)
        .await
        .expect("on JetStream");
    let done = after
        .carts
        .execute(
            "cart-1",
            CartCommand::AddItem {
                item: "cake".into(),
            },
        )
        .await
        .expect("a command on JetStream");
    let shutdown = outflow::CancellationToken::new();
    let running = tokio::spawn({
        let (runner, shutdown) = (after.projections.clone(), shutdown.clone());
        async move { runner.run(shutdown).await }
    });
    after
        .projections
        .wait_for(
            done.checkpoint().expect("written"),
            &["cart_items_v2"],
            Duration::from_secs(30),
        )
        .await
        .expect("the new read model fills from the new log");
    let (items,): (i64,) =
        sqlx::query_as("SELECT items FROM cart_items_v2 WHERE cart_id = 'cart-1'")
            .fetch_one(after.projections.store().pool())
            .await
            .expect("the new table");
    assert_eq!(
        items, 1,
        "the new log holds the one command sent after the move"
    );
    shutdown.cancel();
    running.await.expect("join").expect("the runner stops");
}
