//! The cluster harness itself: a three-node JetStream cluster of the test's
//! own keeps a replicated stream writable when the stream's leader is
//! killed, and loses nothing when the node comes back.

use outflow_tests as common;

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config, Info, StorageType};
use async_nats::jetstream::Context;
use common::nats_cluster::OwnCluster;

/// The stream the test writes to.
const STREAM: &str = "HARNESS";

/// How long the cluster may take to elect leaders, after a start or a kill.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// A JetStream context on every node of `cluster`, reconnecting quickly to
/// whichever node is up.
async fn jetstream(cluster: &OwnCluster) -> Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(300)))
        .connect(cluster.url_list())
        .await
        .expect("connect to the nats-server cluster");
    async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(3))
        .build(client)
}

/// The stream's current information, as its leader reports it.
async fn stream_info(js: &Context) -> Result<Info, String> {
    let stream = js
        .get_stream(STREAM)
        .await
        .map_err(|e| format!("get the stream: {e}"))?;
    stream
        .get_info()
        .await
        .map_err(|e| format!("stream info: {e}"))
}

/// Publishes `payload` with message ID `id` (so a retry after a lost ack
/// stores it once), retrying until JetStream acknowledges it. Returns its
/// sequence number and how long it took.
async fn publish(js: &Context, id: &str, payload: &'static str) -> (u64, Duration) {
    common::eventually(
        &format!("publish and get an ack for `{id}`"),
        ELECTION_TIMEOUT,
        || async move {
            let ack = js
                .send_publish(
                    "harness.events",
                    PublishMessage::build()
                        .payload(payload.into())
                        .message_id(id),
                )
                .await
                .map_err(|e| format!("publish: {e}"))?
                .await
                .map_err(|e| format!("ack: {e}"))?;
            Ok(ack.sequence)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_stream_survives_its_leader_being_killed() {
    let started = Instant::now();
    let mut cluster = OwnCluster::start(3);
    cluster.wait_for_meta_leader(ELECTION_TIMEOUT).await;
    println!(
        "cluster up with a meta leader after {:?}",
        started.elapsed()
    );
    let js = jetstream(&cluster).await;

    let (info, _) = common::eventually("create a stream of 3 replicas", ELECTION_TIMEOUT, || {
        let js = js.clone();
        async move {
            let mut stream = js
                .create_stream(Config {
                    name: STREAM.to_owned(),
                    subjects: vec!["harness.>".to_owned()],
                    num_replicas: 3,
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("create the stream: {e}"))?;
            stream
                .info()
                .await
                .cloned()
                .map_err(|e| format!("stream info: {e}"))
        }
    })
    .await;
    assert_eq!(info.config.num_replicas, 3, "the stream has 3 replicas");

    let (first, _) = publish(&js, "first", "one").await;
    assert_eq!(first, 1, "the first message is the stream's first");

    // The leader as the stream reports it, once it has one.
    let (leader, _) = common::eventually("the stream has a leader", ELECTION_TIMEOUT, || {
        let js = js.clone();
        async move {
            let info = stream_info(&js).await?;
            info.cluster
                .and_then(|cluster| cluster.leader)
                .ok_or_else(|| "no leader yet".to_owned())
        }
    })
    .await;
    let victim = cluster
        .node_index(&leader)
        .unwrap_or_else(|| panic!("the stream's leader `{leader}` is none of the cluster's nodes"));
    cluster.kill(victim);
    assert!(!cluster.is_running(victim), "the killed node is down");
    println!("killed the stream's leader {leader}");

    let (second, took) = publish(&js, "second", "two").await;
    assert_eq!(second, 2, "the second message follows the first");
    println!("published again {took:?} after killing the leader");

    // A new leader, among the survivors.
    let info = stream_info(&js).await.expect("stream info after the kill");
    let new_leader = info
        .cluster
        .and_then(|cluster| cluster.leader)
        .expect("the stream has a new leader");
    assert_ne!(new_leader, leader, "a surviving node leads the stream");

    cluster.start_node(victim);
    assert!(cluster.is_running(victim), "the killed node is back");
    let (info, caught_up) = common::eventually(
        "the restarted node is a current replica again",
        ELECTION_TIMEOUT,
        || {
            let js = js.clone();
            let leader = leader.clone();
            async move {
                let info = stream_info(&js).await?;
                let cluster_info = info.cluster.clone().ok_or("no cluster information")?;
                let current = cluster_info.leader.as_deref() == Some(leader.as_str())
                    || cluster_info
                        .replicas
                        .iter()
                        .any(|peer| peer.name == leader && peer.current);
                if current {
                    Ok(info)
                } else {
                    Err(format!("{leader} not current yet: {cluster_info:?}"))
                }
            }
        },
    )
    .await;
    println!("{leader} was a current replica again {caught_up:?} after its restart");
    assert_eq!(info.state.messages, 2, "both messages are in the stream");
    println!("whole test took {:?}", started.elapsed());
}
