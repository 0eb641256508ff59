//! Runs the aggregates-and-commands chapter's code.

use outflow::{AppendRequest, EventStore, NewEvent, SqliteStore};
use outflow_book_examples::commands::{add_item, cart_bus, race};
use outflow_book_examples::quickstart::{Cart, CartCommand, CartEvent};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outflow-book-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_carry_their_context_and_versions_grow() {
    let dir = scratch("commands");
    let bus = cart_bus(SqliteStore::open(dir.join("c.db")).await.expect("store"));
    assert_eq!(
        add_item(&bus, "cart-1", "tea", "req-1").await.expect("add"),
        1
    );
    assert_eq!(
        add_item(&bus, "cart-1", "milk", "req-2")
            .await
            .expect("add"),
        2
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writer_gets_a_conflict() {
    let dir = scratch("race");
    assert!(race(&dir.join("r.db")).await.expect("race"));
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_event_shape_is_upcast_on_load() {
    let dir = scratch("upcast");
    let store = SqliteStore::open(dir.join("u.db")).await.expect("store");
    // An event as version 0.9 of the cart wrote it.
    let mut old = NewEvent::from_event::<Cart>(
        "cart-old",
        &CartEvent::ItemAdded {
            item: String::new(),
        },
    )
    .expect("an event");
    old.event_version = "0.9".to_owned();
    old.payload = serde_json::json!({ "ItemAdded": { "name": "pen" } });
    store
        .append(AppendRequest {
            aggregate_type: "cart".to_owned(),
            aggregate_id: "cart-old".to_owned(),
            expected_version: 0,
            events: vec![old],
        })
        .await
        .expect("append");
    // Checking out needs an item: the upcast event provides it.
    let bus = cart_bus(store);
    let done = bus
        .execute("cart-old", CartCommand::CheckOut)
        .await
        .expect("check out");
    assert_eq!(done.version, 2);
    std::fs::remove_dir_all(&dir).expect("clean up");
}
