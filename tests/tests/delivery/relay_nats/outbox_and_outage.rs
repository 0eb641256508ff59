//! Outbox messages relayed to JetStream, and a long broker outage that shows in
//! status and loses nothing.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_messages_reach_jetstream_once_and_in_order_per_key() {
    use outflow::outbox::{Outbox, OutboxMessage, OutboxRelay};
    use outflow::relay::{JetStreamOutboxSink, OUTBOX_KEY_HEADER};

    let db = common::TestDb::new("outbox_nats").await;
    let store = db.store().await;
    let js = jetstream(&nats_url()).await;
    let stream = format!("OUTBOX_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let subject = format!("{}.orders", stream.to_lowercase());
    ensure_stream(
        &js,
        &stream,
        vec![subject.clone()],
        Duration::from_secs(120),
    )
    .await
    .expect("stream");
    let outbox = Outbox::new(&store).await.expect("outbox");

    // Twenty messages committed over several transactions, one rolled back.
    let mut sent: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for n in 0..20u32 {
        let key = format!("order-{}", n % 3);
        let mut tx = store.pool().begin().await.expect("begin");
        let id = outbox
            .enqueue(
                &mut tx,
                OutboxMessage::new(key.clone(), subject.clone(), serde_json::json!({ "n": n })),
            )
            .await
            .expect("enqueue");
        outbox.commit(tx).await.expect("commit");
        sent.entry(key).or_default().push(id);
    }
    let mut rolled_back = store.pool().begin().await.expect("begin");
    outbox
        .enqueue(
            &mut rolled_back,
            OutboxMessage::new("order-0", subject.clone(), serde_json::json!({ "n": -1 })),
        )
        .await
        .expect("enqueue");
    rolled_back.rollback().await.expect("rollback");

    let relay = OutboxRelay::builder(outbox.clone(), JetStreamOutboxSink::new(js.clone()))
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let relay = relay.clone();
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox.status().await.expect("status").pending > 0 {
        assert!(
            Instant::now() < deadline,
            "the outbox was not drained within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.expect("relay task").expect("relay");

    let messages = read_stream(&js, &stream).await;
    assert_eq!(
        messages.len(),
        20,
        "every committed message once, none rolled back"
    );
    let mut received: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for message in &messages {
        let headers = message.headers.as_ref().expect("headers");
        let key = headers
            .get(OUTBOX_KEY_HEADER)
            .expect("key header")
            .as_str()
            .to_owned();
        let id: Uuid = headers
            .get("Nats-Msg-Id")
            .expect("message id")
            .as_str()
            .parse()
            .expect("a uuid");
        received.entry(key).or_default().push(id);
    }
    assert_eq!(received, sent, "same messages, same order within each key");
}

/// The broker away for a long outage (20 s; `OUTFLOW_OUTAGE_SECONDS`
/// shortens or lengthens it) while events keep being appended: the relay
/// says so in status all along, publishes everything once the broker is
/// back, and the stream holds each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_broker_outage_shows_in_status_and_loses_nothing() {
    let outage = Duration::from_secs(
        std::env::var("OUTFLOW_OUTAGE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let db = common::TestDb::new("relay_outage").await;
    let store = db.store().await;
    let mut nats = OwnNats::start_new();
    let js = jetstream(&nats.url()).await;
    ensure_stream(
        &js,
        "OUTAGE",
        vec!["outage.>".into()],
        Duration::from_secs(600),
    )
    .await
    .expect("stream");
    let relay = JetStreamRelay::builder(js.clone(), "relay")
        .subject_prefix("outage")
        .ack_timeout(Duration::from_secs(1))
        .build()
        .expect("relay");
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(relay).retry(fast_retries()))
        .build()
        .expect("runner");
    let (runner_stop, runner_task) = common::start_runner(&runner);

    let mut ids = Vec::new();
    let mut version = 0;
    let mut append = |store: PostgresStore| {
        version += 1;
        let event = event("Ticked", serde_json::json!({ "Ticked": { "n": version } }));
        ids.push(event.event_id);
        let expected_version = version - 1;
        async move {
            store
                .append(AppendRequest {
                    aggregate_type: "clock".into(),
                    aggregate_id: "c".into(),
                    expected_version,
                    events: vec![event],
                })
                .await
                .expect("append")[0]
                .checkpoint()
        }
    };
    let mut last = Checkpoint::START;
    for _ in 0..100 {
        last = append(store.clone()).await;
    }
    runner
        .wait_for(last, &["relay"], Duration::from_secs(30))
        .await
        .expect("relayed before the outage");

    nats.kill();
    let down = Instant::now();
    let (mut samples, mut showing) = (0, 0);
    while down.elapsed() < outage {
        last = append(store.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // After the first failed attempt (the acknowledgement times out in
        // 1 s), status says the relay is retrying, and why, all along.
        if down.elapsed() > Duration::from_secs(3) {
            let status = runner.status().await.expect("status");
            samples += 1;
            if status[0].state == ProjectionState::Retrying && status[0].last_error.is_some() {
                showing += 1;
            } else {
                panic!("during the outage: {:?}", status[0]);
            }
        }
    }
    let relayed_before = runner.status().await.expect("status")[0].processed;
    nats.start();
    for _ in 0..100 {
        last = append(store.clone()).await;
    }
    runner
        .wait_for(last, &["relay"], Duration::from_secs(60))
        .await
        .expect("the relay published everything once the broker was back");
    let status = runner.status().await.expect("status");
    assert_eq!(status[0].state, ProjectionState::Live, "{:?}", status[0]);
    assert_eq!(status[0].processed, ids.len() as u64);
    common::stop_runner(runner_stop, runner_task).await;

    let messages = read_stream(&js, "OUTAGE").await;
    let got: Vec<String> = messages.iter().map(|m| msg_id(m)).collect();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicates in the stream");
    let expected: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<HashSet<_>>(),
        expected,
        "the stream holds exactly the appended events"
    );
    println!(
        "outage of {outage:?}: {} events appended ({} during it), status showed it in {showing} of {samples} samples, {relayed_before} relayed before it ended",
        ids.len(),
        ids.len() - 200,
    );
}
