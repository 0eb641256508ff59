//! The shared suites that run on both backends: concurrent writers, a failing
//! sink, restarts, one relay at a time, cleanup, status.

use super::*;

/// A message a writer committed.
#[derive(Debug, Clone)]
struct Sent {
    id: Uuid,
    key: String,
    enqueue_started: Instant,
    committed: Instant,
}

/// Eight writers, each running transactions that write a row of their own
/// and then enqueue one to three messages of random keys, with pauses inside
/// the transactions so that they interleave (and, on PostgreSQL, commit out
/// of transaction id order). Every seventh transaction rolls back. Returns
/// the committed messages and the rolled-back ones.
async fn write_concurrently<S: Sql>(store: &S, outbox: &Outbox<S>) -> (Vec<Sent>, Vec<Uuid>) {
    const WRITERS: u64 = 8;
    const TRANSACTIONS: u64 = 40;
    const KEYS: u64 = 10;
    store
        .exec("CREATE TABLE orders (writer bigint, n bigint, PRIMARY KEY (writer, n))")
        .await;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        let outbox = outbox.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(writer);
            let mut sent = Vec::new();
            let mut rolled_back = Vec::new();
            let mut stale = 0;
            for n in 0..TRANSACTIONS {
                'attempt: loop {
                    let mut tx = outbox.begin().await.expect("begin");
                    store
                        .exec_in(
                            &mut tx,
                            &format!("INSERT INTO orders VALUES ({writer}, {n})"),
                        )
                        .await;
                    let mut enqueued = Vec::new();
                    for m in 0..rng.random_range(1..=3u64) {
                        tokio::time::sleep(Duration::from_micros(rng.random_range(0..1500))).await;
                        let key = format!("key-{}", rng.random_range(0..KEYS));
                        let started = Instant::now();
                        let payload = json!({ "writer": writer, "n": n, "m": m });
                        match outbox
                            .enqueue(&mut tx, OutboxMessage::new(&key, "orders", payload))
                            .await
                        {
                            Ok(id) => enqueued.push((id, key, started)),
                            Err(StoreError::StaleTransaction { .. }) => {
                                stale += 1;
                                tx.rollback().await.expect("rollback stale");
                                continue 'attempt;
                            }
                            Err(error) => panic!("enqueue: {error}"),
                        }
                    }
                    if n % 7 == 3 {
                        tx.rollback().await.expect("rollback");
                        rolled_back.extend(enqueued.into_iter().map(|(id, _, _)| id));
                    } else {
                        outbox.commit(tx).await.expect("commit");
                        let committed = Instant::now();
                        sent.extend(enqueued.into_iter().map(|(id, key, enqueue_started)| Sent {
                            id,
                            key,
                            enqueue_started,
                            committed,
                        }));
                    }
                    break;
                }
            }
            (sent, rolled_back, stale)
        }));
    }
    let mut sent = Vec::new();
    let mut rolled_back = Vec::new();
    let mut stale = 0;
    for writer in writers {
        let (s, r, n) = writer.await.expect("writer");
        sent.extend(s);
        rolled_back.extend(r);
        stale += n;
    }
    println!(
        "{} messages committed, {} rolled back, {stale} stale enqueues retried",
        sent.len(),
        rolled_back.len()
    );
    (sent, rolled_back)
}

/// Checks a delivery log against what was committed: every message at least
/// once, none of the rolled-back ones; each key in delivery order (the
/// records' places), that order keeping causality, and whenever a message
/// was delivered, every earlier message of its key had been delivered
/// before it (redeliveries included).
fn check_delivery(log: &Log, sent: &[Sent], rolled_back: &[Uuid]) {
    let records: Vec<OutboxMessageRecord> = log
        .lock()
        .expect("log")
        .iter()
        .map(|(_, m)| m.clone())
        .collect();
    let delivered: Vec<Uuid> = records.iter().map(|m| m.message_id).collect();
    let seen: HashSet<Uuid> = delivered.iter().copied().collect();
    for message in sent {
        assert!(
            seen.contains(&message.id),
            "{} was never delivered",
            message.id
        );
    }
    for id in rolled_back {
        assert!(!seen.contains(id), "rolled-back {id} was delivered");
    }

    // The order of each key, as the relay must deliver it: by place.
    let mut places: BTreeMap<outflow::Checkpoint, (Uuid, String)> = BTreeMap::new();
    for record in &records {
        places.insert(record.checkpoint(), (record.message_id, record.key.clone()));
    }
    let mut key_order: HashMap<String, Vec<Uuid>> = HashMap::new();
    for (id, key) in places.into_values() {
        key_order.entry(key).or_default().push(id);
    }
    let rank: HashMap<Uuid, (String, usize)> = key_order
        .iter()
        .flat_map(|(key, ids)| {
            ids.iter()
                .enumerate()
                .map(move |(i, id)| (*id, (key.clone(), i)))
        })
        .collect();

    // Delivery never runs ahead of a key's order: message #i of a key is only
    // delivered once #0..#i-1 have been.
    let mut reached: HashMap<String, usize> = HashMap::new();
    for id in &delivered {
        let (key, i) = rank[id].clone();
        let next = reached.entry(key.clone()).or_default();
        assert!(
            i <= *next,
            "key {key}: message #{i} delivered before #{next}"
        );
        if i == *next {
            *next += 1;
        }
    }
    for (key, ids) in &key_order {
        assert_eq!(reached.get(key), Some(&ids.len()), "key {key} complete");
    }

    // The order keeps causality: a message enqueued after another of its key
    // committed comes after it.
    let by_id: HashMap<Uuid, &Sent> = sent.iter().map(|s| (s.id, s)).collect();
    for ids in key_order.values() {
        for (i, first) in ids.iter().enumerate() {
            let first = by_id[first];
            for then in &ids[i + 1..] {
                let then = by_id[then];
                assert!(
                    then.committed >= first.enqueue_started,
                    "key {}: {} was enqueued after {} committed, yet comes first",
                    first.key,
                    first.id,
                    then.id
                );
            }
        }
    }
}

pub(super) async fn concurrent_writers<S: Sql>(store: S) {
    let outbox = Outbox::new(&store).await.expect("outbox");
    let log: Log = Arc::default();
    let started = Instant::now();
    let running = Running::start(relay(&outbox, "relay-a", Recorder::new("a", &log)));
    let (sent, rolled_back) = write_concurrently(&store, &outbox).await;
    let ids: Vec<Uuid> = sent.iter().map(|s| s.id).collect();
    until_delivered(&log, &ids).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.stop().await;
    println!(
        "{} messages delivered in {:?}",
        ids.len(),
        started.elapsed()
    );
    check_delivery(&log, &sent, &rolled_back);
    assert_eq!(
        delivered_ids(&log).len(),
        sent.len(),
        "a healthy sink gets each message once"
    );
}

pub(super) async fn sink_failing_at_random<S: Sql>(store: S) {
    let outbox = Outbox::new(&store).await.expect("outbox");
    let log: Log = Arc::default();
    let sink = Recorder::new("a", &log).failing(0.3);
    let failures = sink.failures.clone();
    let running = Running::start(relay(&outbox, "relay-a", sink));
    let (sent, rolled_back) = write_concurrently(&store, &outbox).await;
    let ids: Vec<Uuid> = sent.iter().map(|s| s.id).collect();
    until_delivered(&log, &ids).await;
    running.stop().await;
    let failures = *failures.lock().expect("failures");
    println!(
        "{failures} failed sink calls, {} deliveries for {} messages",
        delivered_ids(&log).len(),
        ids.len()
    );
    assert!(failures >= 3, "the sink failed often: {failures}");
    check_delivery(&log, &sent, &rolled_back);
}

pub(super) async fn restarted_relay_resumes<S: Sql>(store: S) {
    let outbox = Outbox::new(&store).await.expect("outbox");
    let log: Log = Arc::default();
    let mut first = Vec::new();
    for i in 0..30 {
        first.push(send(&outbox, &format!("k{}", i % 4), i).await);
    }
    let running = Running::start(relay(&outbox, "relay-a", Recorder::new("a", &log)));
    until_delivered(&log, &first).await;
    running.stop().await;
    // While no relay runs, messages wait and the status says so.
    let mut second = Vec::new();
    for i in 30..60 {
        second.push(send(&outbox, &format!("k{}", i % 4), i).await);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = outbox.status().await.expect("status");
    assert_eq!(status.pending, 30);
    assert!(status.oldest_pending_age.expect("an oldest") >= Duration::from_millis(50));
    assert_eq!(status.relay, None);
    assert_eq!(status.delivered, 30);
    // Another relay (another node) resumes from the stored cursor.
    let running = Running::start(relay(&outbox, "relay-b", Recorder::new("b", &log)));
    until_delivered(&log, &second).await;
    let status = eventually("relay-b caught up", Duration::from_secs(10), || {
        let outbox = outbox.clone();
        async move {
            let status = outbox.status().await.ok()?;
            (status.pending == 0 && status.state == ProjectionState::Live).then_some(status)
        }
    })
    .await;
    assert_eq!(status.relay.as_deref(), Some("relay-b"));
    assert_eq!(status.delivered, 60);
    assert_eq!(status.last_error, None);
    running.stop().await;
    let delivered = log.lock().expect("log").clone();
    let expected: Vec<Uuid> = first.iter().chain(&second).copied().collect();
    assert_eq!(
        delivered
            .iter()
            .map(|(_, m)| m.message_id)
            .collect::<Vec<_>>(),
        expected,
        "nothing skipped, nothing repeated, in order"
    );
    assert!(delivered[..30].iter().all(|(node, _)| node == "a"));
    assert!(delivered[30..].iter().all(|(node, _)| node == "b"));
}

pub(super) async fn one_relay_at_a_time<S: Sql>(store: S) {
    let log: Log = Arc::default();
    // Two nodes, each with its own handle and relay.
    let outbox_a = Outbox::new(&store).await.expect("outbox a");
    let outbox_b = Outbox::new(&store).await.expect("outbox b");
    // A lease of 5 s: long enough that, on a loaded machine (the suites of
    // both backends run at once here), only a crash lets it lapse.
    let relay = |outbox: &Outbox<S>, node: &str| {
        outbox
            .relay(Recorder::new(node, &log))
            .node_id(node)
            .batch_size(17)
            .lease_ttl(Duration::from_secs(5))
            .heartbeat_interval(Duration::from_millis(200))
            .poll_interval(Duration::from_millis(100))
            .retry(common::outbox::fast_retry())
            .build()
            .expect("relay")
    };
    let a = Running::start(relay(&outbox_a, "node-a"));
    let b = Running::start(relay(&outbox_b, "node-b"));
    let mut before = Vec::new();
    for i in 0..40 {
        before.push(send(&outbox_a, &format!("k{}", i % 5), i).await);
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    until_delivered(&log, &before).await;
    // Recorded, too (a crash between delivering and recording would make the
    // next relay deliver the batch again: at least once).
    eventually("the deliveries recorded", Duration::from_secs(10), || {
        let outbox = outbox_a.clone();
        async move { (outbox.status().await.ok()?.pending == 0).then_some(()) }
    })
    .await;
    let leaders: BTreeMap<String, usize> =
        log.lock()
            .expect("log")
            .iter()
            .fold(BTreeMap::new(), |mut counts, (node, _)| {
                *counts.entry(node.clone()).or_default() += 1;
                counts
            });
    assert_eq!(leaders.len(), 1, "one relay delivered: {leaders:?}");
    let leader = leaders.keys().next().expect("a leader").clone();
    let status = outbox_a.status().await.expect("status");
    assert_eq!(status.relay.as_deref(), Some(leader.as_str()));
    // The leader dies without giving its lease back.
    let (dead, survivor, survivor_name) = if leader == "node-a" {
        (a, b, "node-b")
    } else {
        (b, a, "node-a")
    };
    dead.crash().await;
    let crashed_at = Instant::now();
    let mut after = Vec::new();
    for i in 40..80 {
        after.push(send(&outbox_a, &format!("k{}", i % 5), i).await);
    }
    until_delivered(&log, &after).await;
    let failover = crashed_at.elapsed();
    println!("failover took {failover:?} (lease 5 s, heartbeat 200 ms)");
    assert!(
        failover >= Duration::from_secs(1),
        "the lease held: {failover:?}"
    );
    survivor.stop().await;
    let delivered = log.lock().expect("log").clone();
    let by_survivor: Vec<Uuid> = delivered
        .iter()
        .filter(|(node, _)| node == survivor_name)
        .map(|(_, m)| m.message_id)
        .collect();
    assert_eq!(
        by_survivor, after,
        "the survivor delivered the rest, in order"
    );
    let all: Vec<Uuid> = delivered.iter().map(|(_, m)| m.message_id).collect();
    let expected: Vec<Uuid> = before.iter().chain(&after).copied().collect();
    assert_eq!(all, expected, "nothing skipped or repeated");
}

/// Cleanup deletes delivered messages only; a relay with a short retention
/// deletes them by itself.
pub(super) async fn cleanup_keeps_pending<S: Sql>(store: S) {
    let outbox = Outbox::new(&store).await.expect("outbox");
    let log: Log = Arc::default();
    let mut delivered = Vec::new();
    for i in 0..25 {
        delivered.push(send(&outbox, "k", i).await);
    }
    let running = Running::start(relay(&outbox, "relay-a", Recorder::new("a", &log)));
    until_delivered(&log, &delivered).await;
    running.stop().await;
    let mut pending = Vec::new();
    for i in 25..30 {
        pending.push(send(&outbox, "k", i).await);
    }
    assert_eq!(
        outbox
            .cleanup(Duration::from_secs(3600))
            .await
            .expect("cleanup"),
        0,
        "nothing is older than the retention"
    );
    assert_eq!(outbox.cleanup(Duration::ZERO).await.expect("cleanup"), 25);
    assert_eq!(store.count("SELECT count(*) FROM events_outbox").await, 5);
    assert_eq!(outbox.status().await.expect("status").pending, 5);
    // A relay with a short retention delivers the pending ones, then deletes
    // everything by itself.
    let running = Running::start(
        outbox
            .relay(Recorder::new("b", &log))
            .node_id("relay-b")
            .retention(Duration::from_millis(300))
            .cleanup_interval(Duration::from_millis(100))
            .build()
            .expect("relay"),
    );
    until_delivered(&log, &pending).await;
    eventually("the relay's own cleanup", Duration::from_secs(20), || {
        let store = store.clone();
        async move { (store.count("SELECT count(*) FROM events_outbox").await == 0).then_some(()) }
    })
    .await;
    running.stop().await;
    let expected: Vec<Uuid> = delivered.iter().chain(&pending).copied().collect();
    assert_eq!(
        delivered_ids(&log),
        expected,
        "pending messages were delivered, once, in order"
    );
}

pub(super) async fn failing_sink_shows_in_status<S: Sql>(store: S) {
    let outbox = Outbox::new(&store).await.expect("outbox");
    let log: Log = Arc::default();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink = InProcessSink::new({
        let (log, down, calls) = (log.clone(), down.clone(), calls.clone());
        move |batch: Vec<OutboxMessageRecord>| {
            let (log, down, calls) = (log.clone(), down.clone(), calls.clone());
            async move {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if down.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(HandlerError::msg("the broker is down"));
                }
                let mut log = log.lock().map_err(|_| HandlerError::msg("poisoned"))?;
                log.extend(batch.into_iter().map(|m| ("a".to_owned(), m)));
                Ok(())
            }
        }
    });
    let ids = [
        send(&outbox, "k", 1).await,
        send(&outbox, "k", 2).await,
        send(&outbox, "other", 1).await,
    ];
    let running = Running::start(relay(&outbox, "relay-a", sink));
    let status = eventually(
        "the status shows the failure",
        Duration::from_secs(10),
        || {
            let outbox = outbox.clone();
            async move {
                let status = outbox.status().await.ok()?;
                (status.state == ProjectionState::Retrying).then_some(status)
            }
        },
    )
    .await;
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("the broker is down")),
        "{status:?}"
    );
    assert_eq!(status.pending, 3);
    assert_eq!(status.relay.as_deref(), Some("relay-a"));
    // The relay keeps trying (backoff up to 20 ms here), and skips nothing.
    eventually("several attempts", Duration::from_secs(10), || {
        let n = calls.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n >= 5).then_some(()) }
    })
    .await;
    assert!(delivered_ids(&log).is_empty());
    assert_eq!(outbox.status().await.expect("status").pending, 3);
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    until_delivered(&log, &ids).await;
    let status = eventually("back to live", Duration::from_secs(10), || {
        let outbox = outbox.clone();
        async move {
            let status = outbox.status().await.ok()?;
            (status.state == ProjectionState::Live && status.pending == 0).then_some(status)
        }
    })
    .await;
    assert_eq!(status.last_error, None);
    running.stop().await;
    assert_eq!(delivered_ids(&log), ids.to_vec(), "once each, in order");
}
