//! Lost publish acknowledgements, tailing readers, upcasters and snapshots.

use super::*;

/// A TCP relay between a client and nats-server that, once armed, cuts
/// the connection instead of passing on the next publish acknowledgement
/// (a JetStream `PubAck`, `{"stream":…,"seq":…}`): the message is stored,
/// the client never hears so.
struct AckDropper {
    port: u16,
    armed: Arc<AtomicBool>,
    dropped: Arc<AtomicBool>,
}

impl AckDropper {
    async fn start(server: &str) -> AckDropper {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let armed = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let server = server.trim_start_matches("nats://").to_owned();
        tokio::spawn({
            let armed = armed.clone();
            let dropped = dropped.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(upstream) = TcpStream::connect(&server).await else {
                        continue;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = upstream.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    });
                    let armed = armed.clone();
                    let dropped = dropped.clone();
                    tokio::spawn(async move {
                        let mut buffer = vec![0u8; 64 * 1024];
                        while let Ok(n) = server_read.read(&mut buffer).await {
                            if n == 0 {
                                break;
                            }
                            let chunk = &buffer[..n];
                            let text = String::from_utf8_lossy(chunk);
                            if armed.load(Ordering::SeqCst)
                                && text.contains("\"stream\"")
                                && text.contains("\"seq\"")
                            {
                                armed.store(false, Ordering::SeqCst);
                                dropped.store(true, Ordering::SeqCst);
                                break;
                            }
                            if client_write.write_all(chunk).await.is_err() {
                                break;
                            }
                        }
                        up.abort();
                    });
                }
            }
        });
        AckDropper {
            port,
            armed,
            dropped,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_ack_is_lost_is_stored_once() {
    let dropper = AckDropper::start(&common::nats_url()).await;
    let store =
        common::jetstream_store(&format!("nats://127.0.0.1:{}", dropper.port), "lost_ack", 1).await;
    let request = |expected: u64, amount: u64| AppendRequest {
        aggregate_type: "account".into(),
        aggregate_id: "lost-ack".into(),
        expected_version: expected,
        events: vec![common::deposit_event(amount), common::deposit_event(amount)],
    };
    store.append(request(0, 1)).await.expect("a first append");
    dropper.armed.store(true, Ordering::SeqCst);
    let written = store
        .append(request(2, 2))
        .await
        .expect("the append succeeds after its ack was lost");
    assert!(
        dropper.dropped.load(Ordering::SeqCst),
        "an acknowledgement was dropped"
    );
    assert_eq!(
        written.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![3, 4]
    );
    // Stored once: the stream has two messages, the aggregate four events,
    // and the returned positions are the stored ones.
    let log = common::read_until(&store, Checkpoint::START, &outflow::LogFilter::all(), 4).await;
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(&log[2..], &written[..]);
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(store.stream_name(0).expect("stream"))
        .await
        .expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 2);
    // The next append follows on.
    store.append(request(4, 3)).await.expect("append after");
}

/// Concurrent writers on a 3-node cluster, 4 partitions, and a reader
/// tailing each partition while they write: every reader sees each of its
/// partition's acknowledged events once, in strictly increasing log order,
/// with every aggregate's events in sequence order (positions are assigned
/// at commit by the stream's leader: there is no late commit to skip).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tailing_readers_see_every_event_once_in_order() {
    let store = common::jetstream_store(&common::nats_cluster_url(), "ordering", 4).await;
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for partition in 0..4 {
        let (store, done) = (store.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let filter = outflow::LogFilter::all().with_partition(partition, 4);
            let mut cursor = Checkpoint::START;
            let mut seen = Vec::new();
            let mut idle_after_done = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let batch = store
                    .read_log(cursor, &filter, 37)
                    .await
                    .expect("read a partition");
                for event in &batch {
                    assert!(event.checkpoint() > cursor, "the log went backwards");
                    assert_eq!(store.partition_of(&event.aggregate_id), partition);
                    cursor = event.checkpoint();
                }
                if batch.is_empty() {
                    if finished {
                        idle_after_done += 1;
                        if idle_after_done > 2 {
                            return seen;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen.extend(batch);
            }
        }));
    }
    let mut writers = Vec::new();
    for writer in 0..8 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for round in 0..15u64 {
                for k in 0..4 {
                    let id = format!("w{writer}-{k}");
                    let count = 1 + (round + k) % 3;
                    let written = store
                        .append(common::deposits(
                            "account",
                            &id,
                            round_version(round, k),
                            count,
                        ))
                        .await
                        .expect("append");
                    acked.extend(written);
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await.expect("a writer panicked"));
    }
    done.store(true, Ordering::SeqCst);
    let mut read = Vec::new();
    for reader in readers {
        read.extend(reader.await.expect("a reader panicked"));
    }
    let acked_ids: std::collections::HashSet<_> = acked.iter().map(|e| e.event_id).collect();
    let read_ids: std::collections::HashSet<_> = read.iter().map(|e| e.event_id).collect();
    assert_eq!(read_ids.len(), read.len(), "a reader saw an event twice");
    assert_eq!(
        read_ids, acked_ids,
        "the readers saw exactly the acknowledged events"
    );
    let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for event in &read {
        let previous = last
            .insert(&event.aggregate_id, event.sequence)
            .unwrap_or(0);
        assert_eq!(
            event.sequence,
            previous + 1,
            "`{}` out of order",
            event.aggregate_id
        );
    }
    // What each append returned is what the readers saw.
    let by_id: std::collections::HashMap<_, _> = read.iter().map(|e| (e.event_id, e)).collect();
    for event in &acked {
        assert_eq!(by_id[&event.event_id], event);
    }
}

/// The version of aggregate `k` before `round` in the ordering test (each
/// round appends `1 + (round + k) % 3` events).
fn round_version(round: u64, k: u64) -> u64 {
    (0..round).map(|r| 1 + (r + k) % 3).sum()
}

/// Reads a 0.9 `Deposited` (`{"cents": "…"}`) as today's 1.0.
struct Cents;

impl outflow::upcast::Upcaster for Cents {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        event_type == "Deposited" && event_version == "0.9"
    }
    fn upcast(
        &self,
        mut event: cqrs_es::persist::SerializedEvent,
    ) -> Result<cqrs_es::persist::SerializedEvent, outflow::upcast::UpcastError> {
        let cents = event.payload["Deposited"]["cents"]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| outflow::upcast::UpcastError::new("`cents` is not a number"))?;
        event.payload = serde_json::json!({ "Deposited": { "amount": cents } });
        event.event_version = "1.0".to_owned();
        Ok(event)
    }
}

/// Upcasters and snapshots on JetStream as on the other backends: a stored
/// 0.9 event is read through the upcaster; snapshots (in the key-value
/// bucket) are taken every 3 events and a command on top of one sees the
/// whole balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upcasters_and_snapshots() {
    let store = common::jetstream_store(&common::nats_url(), "upcast", 2).await;
    let bus = CommandBus::<BankAccount, _>::builder(store.clone(), ())
        .upcaster(Box::new(Cents))
        .snapshot_every(3)
        .build();
    bus.execute(
        "old",
        BankCommand::Open {
            owner: "Old".into(),
        },
    )
    .await
    .expect("open");
    store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "old".into(),
            expected_version: 1,
            events: vec![outflow::NewEvent {
                event_version: "0.9".into(),
                payload: serde_json::json!({ "Deposited": { "cents": "500" } }),
                event_type: "Deposited".into(),
                ..common::deposit_event(0)
            }],
        })
        .await
        .expect("an old-format event");
    for amount in [10, 20, 30, 40] {
        bus.execute("old", BankCommand::Deposit { amount })
            .await
            .expect("deposit on top of the upcast event");
    }
    // 500 + 100 in the account: withdrawing 600 passes, 601 would not.
    match bus
        .execute("old", BankCommand::Withdraw { amount: 601 })
        .await
    {
        Err(outflow::CommandError::Rejected(_)) => {}
        other => panic!("601 of 600 must be refused, got {other:?}"),
    }
    bus.execute("old", BankCommand::Withdraw { amount: 600 })
        .await
        .expect("the whole balance, upcast event included");
    let loaded = store.load("account", "old", true).await.expect("load");
    let snapshot = loaded.snapshot.expect("a snapshot was stored");
    assert!(snapshot.version >= 3, "{snapshot:?}");
    assert_eq!(
        loaded.events.first().map(|e| e.sequence),
        Some(snapshot.version + 1),
        "the load continues after the snapshot"
    );
}
