//! Runs the operations chapter's code on SQLite.

use std::time::Duration;

use outflow::prelude::*;
use outflow_book_examples::operations::{health, rebuild, retry_parked};
use outflow_book_examples::projections::ItemCounts;
use outflow_book_examples::quickstart::{Cart, CartCommand};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_rebuild_and_dead_letters() {
    let dir = std::env::temp_dir().join(format!("outflow-book-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let store = SqliteStore::open(dir.join("ops.db")).await.expect("store");
    let carts = CommandBus::<Cart, _>::new(store.clone(), ());
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(ItemCounts))
        .build()
        .expect("runner");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (runner, shutdown) = (runner.clone(), shutdown.clone());
        async move { runner.run(shutdown).await }
    });
    let mut last = None;
    for i in 0..5 {
        let done = carts
            .execute(
                &format!("cart-{i}"),
                CartCommand::AddItem { item: "tea".into() },
            )
            .await
            .expect("command");
        last = done.checkpoint();
    }
    runner
        .wait_for(
            last.expect("a checkpoint"),
            &["item_counts"],
            Duration::from_secs(5),
        )
        .await
        .expect("caught up");

    let (lines, alarm) = health(&runner, Duration::from_secs(60))
        .await
        .expect("status");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("item_counts[0/1]"), "{lines:?}");
    assert!(!alarm, "{lines:?}");

    assert_eq!(rebuild(&runner, "item_counts").await.expect("rebuild"), 5);
    let (items,): (i64,) = outflow::sqlx::query_as("SELECT sum(items) FROM item_counts")
        .fetch_one(store.readers())
        .await
        .expect("the rebuilt read model");
    assert_eq!(items, 5);
    assert_eq!(
        retry_parked(&runner, "item_counts")
            .await
            .expect("dead letters"),
        0
    );

    shutdown.cancel();
    running.await.expect("joined").expect("run");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
