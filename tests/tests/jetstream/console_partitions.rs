//! The console shows a JetStream store's partitions: on the shared 3-node
//! cluster, each of 3 partition streams with the server leading it (the
//! one the cluster names), its two other replicas and its appends.

use outflow_tests as common;

use std::collections::HashSet;
use std::sync::Arc;

use outflow::admin::Admin;
use outflow::runner::ProjectionRunner;
use outflow::{AppendRequest, EventStore};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_each_partition_with_its_leader_and_replicas() {
    let store = common::jetstream_store(&common::nats_cluster_url(), "console_partitions", 3).await;
    let mut appended = 0u64;
    for i in 0..12 {
        store
            .append(AppendRequest {
                aggregate_type: "account".into(),
                aggregate_id: format!("acc-{i}"),
                expected_version: 0,
                events: vec![common::deposit_event(10), common::deposit_event(20)],
            })
            .await
            .expect("append");
        appended += 1;
    }
    let dir = common::TestDir::new("console_partitions");
    let runner = ProjectionRunner::with_log(Arc::new(store.clone()), dir.sqlite().await)
        .build()
        .expect("runner");

    let console = Admin::new(runner)
        .reader_token("read-secret")
        .jetstream(store.clone())
        .router();
    let base = common::serve_console(console).await;
    let answer: Value = reqwest::Client::new()
        .get(format!("{base}/api/partitions"))
        .bearer_auth("read-secret")
        .send()
        .await
        .expect("GET /api/partitions")
        .json()
        .await
        .expect("JSON");

    let partitions = answer["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("no partitions: {answer}"));
    assert_eq!(partitions.len(), 3, "{answer}");
    let leaders = store.leaders().await.expect("the cluster's leaders");
    let mut messages = 0;
    for (i, partition) in partitions.iter().enumerate() {
        assert_eq!(partition["partition"], json!(i), "{partition}");
        assert_eq!(
            partition["stream"].as_str(),
            store.stream_name(i as u32),
            "{partition}"
        );
        assert_eq!(partition["answered"], json!(true), "{partition}");
        let leader = partition["leader"]
            .as_str()
            .unwrap_or_else(|| panic!("no leader: {partition}"));
        assert_eq!(Some(leader), leaders[i].as_deref(), "{partition}");
        let replicas: HashSet<&str> = partition["replicas"]
            .as_array()
            .unwrap_or_else(|| panic!("no replicas: {partition}"))
            .iter()
            .filter_map(|r| r["server"].as_str())
            .collect();
        assert_eq!(replicas.len(), 2, "two other replicas: {partition}");
        assert!(!replicas.contains(leader), "{partition}");
        messages += partition["messages"].as_u64().unwrap_or(0);
    }
    // One message per append, each in one partition.
    assert_eq!(messages, appended, "{answer}");
}
