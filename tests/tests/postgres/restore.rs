//! After a logical dump and restore into another cluster, transaction ids
//! start lower than the restored rows' ids. `rebase_after_restore` repairs
//! the log so that readers neither miss nor reorder the new events.

use outflow_tests as common;

use outflow::{AppendRequest, Checkpoint, EventStore, LogFilter, NewEvent};
use serde_json::json;

fn request(id: &str) -> AppendRequest {
    AppendRequest {
        aggregate_type: "account".into(),
        aggregate_id: id.into(),
        expected_version: 0,
        events: vec![NewEvent {
            event_id: uuid::Uuid::now_v7(),
            event_type: "AccountOpened".into(),
            event_version: "1.0".into(),
            payload: json!({ "AccountOpened": { "owner": id } }),
            metadata: Default::default(),
            correlation_id: None,
            causation_id: None,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebasing_after_a_restore_keeps_new_events_readable_in_order() {
    let db = common::TestDb::new("restore").await;
    let store = db.store().await;
    let all = LogFilter::all();
    for id in ["old-1", "old-2", "old-3"] {
        store.append(request(id)).await.expect("append old");
    }
    assert_eq!(
        store.rebase_after_restore().await.expect("no-op"),
        0,
        "nothing to do normally"
    );

    // A reader has read everything before the dump.
    let old = common::read_until(&store, Checkpoint::START, &all, 3).await;
    let reader_checkpoint = old[2].checkpoint();

    // What a restore into a younger cluster looks like: the rows' ids are far
    // ahead of the ids this cluster hands out.
    sqlx::query(
        "UPDATE events SET transaction_id = (pg_current_xact_id()::text::bigint + 1000000)::text::xid8",
    )
    .execute(store.pool())
    .await
    .expect("simulate restored ids");
    store.append(request("new-1")).await.expect("append new");
    store.append(request("new-2")).await.expect("append new");

    // The hazard: the restored rows look like they belong to transactions
    // still to come, and the new ones sort before them.
    let from_start = common::read_until(&store, Checkpoint::START, &all, 2).await;
    let ids: Vec<_> = from_start.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert_eq!(ids, ["new-1", "new-2"], "old events hidden, new ones first");

    assert_eq!(store.rebase_after_restore().await.expect("rebase"), 5);
    let resumed = common::read_until(
        &store,
        Checkpoint::new(0, reader_checkpoint.position),
        &all,
        2,
    )
    .await;
    let ids: Vec<_> = resumed.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert_eq!(ids, ["new-1", "new-2"]);
    let whole = common::read_until(&store, Checkpoint::START, &all, 5).await;
    let ids: Vec<_> = whole.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert_eq!(ids, ["old-1", "old-2", "old-3", "new-1", "new-2"]);

    // Writers go on normally afterwards.
    store
        .append(request("new-3"))
        .await
        .expect("append after rebase");
    let tail = common::read_until(&store, whole[4].checkpoint(), &all, 1).await;
    assert_eq!(tail[0].aggregate_id, "new-3");
    assert_eq!(store.rebase_after_restore().await.expect("second run"), 0);
}
