//! The relay across two server kills: every event published exactly once.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_publishes_10k_events_exactly_once_across_two_server_kills() {
    let started = Instant::now();
    let db = common::TestDb::new("relay_kill").await;
    let store = db.store().await;
    create_effects(store.pool(), "relay_effects").await;
    let mut nats = OwnNats::start_new();
    let relay_js = jetstream(&nats.url()).await;
    let consumer_js = jetstream(&nats.url()).await;
    ensure_stream(
        &relay_js,
        "RELAY_KILL",
        vec!["kill.>".into()],
        Duration::from_secs(600),
    )
    .await
    .expect("stream");

    let relay = JetStreamRelay::builder(relay_js.clone(), "relay")
        .subject_prefix("kill")
        .ack_timeout(Duration::from_secs(1))
        .build()
        .expect("relay");
    let runner = ProjectionRunner::builder(store.clone())
        .projection(
            ProjectionOptions::new(relay)
                .batch_size(500)
                .retry(fast_retries())
                .on_error(OnError::Stop),
        )
        .build()
        .expect("runner");
    let (runner_stop, runner_task) = common::start_runner(&runner);
    let consumer = JetStreamConsumer::builder(
        consumer_js,
        "RELAY_KILL",
        "effects",
        store.clone(),
        ApplyOnce {
            table: "relay_effects",
        },
    )
    .dead_letters(PostgresDeadMessages::default())
    .ack_wait(Duration::from_secs(2))
    .batch_size(200)
    .pull_expires(Duration::from_secs(2))
    .retry_backoff(Duration::from_millis(50), Duration::from_millis(500))
    .build()
    .expect("consumer");
    let (consumer_stop, consumer_task) = spawn_consumer(consumer);

    // Four writers append 10 events per command, paced so that the writes
    // span both outages.
    let written = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let store = store.clone();
        let written = written.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut last = Checkpoint::START;
            for round in 0..PER_AGGREGATE / PER_APPEND {
                for aggregate in (writer..AGGREGATES).step_by(4) {
                    let events: Vec<NewEvent> = (0..PER_APPEND)
                        .map(|i| {
                            event(
                                "Deposited",
                                serde_json::json!({ "amount": round * PER_APPEND + i }),
                            )
                        })
                        .collect();
                    ids.extend(events.iter().map(|e| e.event_id));
                    let recorded = store
                        .append(AppendRequest {
                            aggregate_type: "account".into(),
                            aggregate_id: format!("acc-{aggregate:03}"),
                            expected_version: (round * PER_APPEND) as u64,
                            events,
                        })
                        .await
                        .expect("append");
                    last = last.max(recorded.last().expect("written").checkpoint());
                    written.fetch_add(PER_APPEND, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }
            (ids, last)
        }));
    }

    // Two outages, each while the relay and the consumer are busy: SIGKILL,
    // two seconds down, then the same server (port, storage) again. Each
    // outage must make the relay retry (its acks time out after 1 s).
    let mut outages_seen = Vec::new();
    for threshold in [TOTAL * 3 / 10, TOTAL * 7 / 10] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while written.load(Ordering::Relaxed) < threshold {
            assert!(Instant::now() < deadline, "writers stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        nats.kill();
        let down = Instant::now();
        let mut retried = false;
        while down.elapsed() < Duration::from_secs(2) {
            let status = runner.status().await.expect("status");
            retried |= status
                .iter()
                .any(|s| s.state == ProjectionState::Retrying && s.last_error.is_some());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nats.start();
        outages_seen.push(retried);
    }

    let mut expected_ids = HashSet::new();
    let mut head = Checkpoint::START;
    for writer in writers {
        let (ids, last) = writer.await.expect("writer");
        expected_ids.extend(ids);
        head = head.max(last);
    }
    assert_eq!(expected_ids.len(), TOTAL);
    runner
        .wait_for(head, &["relay"], Duration::from_secs(60))
        .await
        .expect("the relay published every event");
    let status = runner.status().await.expect("status");
    assert_eq!(status[0].parked, 0, "the relay never parks");
    assert_eq!(status[0].processed, TOTAL as u64);
    assert_eq!(
        outages_seen,
        [true, true],
        "each outage made the relay retry"
    );

    // The consumer applies every event once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let inbox = count(
            store.pool(),
            "SELECT count(*) FROM events_inbox WHERE handler = $1",
            "effects",
        )
        .await;
        if inbox as usize == TOTAL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer handled {inbox} of {TOTAL} messages within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    runner_stop.cancel();
    consumer_stop.cancel();
    runner_task.await.expect("runner task");
    consumer_task.await.expect("consumer task");

    // The stream holds every event id exactly once.
    let messages = read_stream(&relay_js, "RELAY_KILL").await;
    let ids: Vec<String> = messages.iter().map(|m| msg_id(m)).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), TOTAL, "stream holds {} messages", ids.len());
    assert_eq!(unique.len(), TOTAL, "duplicates in the stream");
    let expected: HashSet<String> = expected_ids.iter().map(Uuid::to_string).collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<HashSet<_>>(),
        expected,
        "the stream holds exactly the written events"
    );

    // Each applied once: one effect row per event, none applied twice.
    let (rows, max_applied, dead): (i64, Option<i32>, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM relay_effects), (SELECT max(applied) FROM relay_effects),
                (SELECT count(*) FROM events_dead_messages)",
    )
    .fetch_one(store.pool())
    .await
    .expect("effects");
    assert_eq!(rows as usize, TOTAL);
    assert_eq!(max_applied, Some(1), "an event was applied twice");
    assert_eq!(dead, 0);
    let effect_ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM relay_effects")
        .fetch_all(store.pool())
        .await
        .expect("effect ids");
    assert_eq!(
        effect_ids.into_iter().collect::<HashSet<_>>(),
        expected,
        "the consumer applied exactly the written events"
    );
    println!("relay test took {:?}", started.elapsed());
}
