//! The JetStream event store on a 3-node cluster of the test's own, hurt
//! on purpose:
//!
//! - the stream's leader is SIGKILLed while 8 writers run commands: writes
//!   resume after the re-election (the pause is printed), every
//!   acknowledged command is in the log exactly once, conflicts on a shared
//!   account are still detected, and a projection into PostgreSQL equals a
//!   fold of the log;
//! - one node down, writes go on; two down, appends fail with
//!   `StoreError::Unavailable` within a bounded time, nothing acknowledged
//!   is lost, and writes resume when a node comes back.
//!
//! Needs `OUTFLOW_NATS_BIN` and `DATABASE_URL` (scripts/test.sh sets both).

use outflow_tests as common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nats_cluster::OwnCluster;
use example_accounts::projections::{BalanceRow, Balances};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::store::jetstream::JetStreamStore;
use outflow::{
    AppendRequest, Checkpoint, CommandBus, CommandContext, CommandError, EventLog, EventStore,
    LogFilter,
};
use uuid::Uuid;

const WRITERS: usize = 8;

async fn cluster_store(cluster: &OwnCluster, timeout: Duration) -> JetStreamStore {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(300)))
        .connect(cluster.url_list())
        .await
        .expect("connect to the cluster");
    JetStreamStore::builder(client)
        .prefix("hurt")
        .replicas(3)
        .timeout(timeout)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("a JetStream store on the cluster")
}

/// The node leading a stream now, as the cluster reports it.
async fn leader(store: &JetStreamStore, cluster: &OwnCluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for i in (0..cluster.node_count()).filter(|&i| cluster.is_running(i)) {
            let Ok(client) = async_nats::connect(cluster.url(i)).await else {
                continue;
            };
            let js = async_nats::jetstream::new(client);
            let Ok(mut stream) = js.get_stream(store.stream_name(0).expect("stream")).await else {
                continue;
            };
            if let Ok(info) = stream.info().await {
                if let Some(name) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                    if let Some(index) = cluster.node_index(&name) {
                        return index;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the stream has no leader within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the writers saw.
#[derive(Default)]
struct Record {
    /// Event ids of every acknowledged command.
    acknowledged: Vec<Uuid>,
    /// Checkpoints of every acknowledged command.
    checkpoints: Vec<Checkpoint>,
    /// When each acknowledgement came.
    acked_at: Vec<Instant>,
    /// Conflicts met on the shared account.
    conflicts: usize,
    /// Calls that failed as unavailable (retried with the same command id).
    unavailable: usize,
}

/// Runs one command at most once, retrying with the same command id on
/// conflicts and while the cluster is unavailable.
async fn run_once(
    bus: &CommandBus<BankAccount, JetStreamStore>,
    id: &str,
    command: BankCommand,
    record: &Mutex<Record>,
) {
    let context = CommandContext::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match bus.execute_once(id, command.clone(), context.clone()).await {
            Ok(done) => {
                let mut record = record.lock().expect("record");
                record
                    .acknowledged
                    .extend(done.events.iter().map(|e| e.event_id));
                record.checkpoints.push(done.checkpoint().expect("written"));
                record.acked_at.push(Instant::now());
                return;
            }
            Err(CommandError::Store(error)) if error.is_conflict() => {
                record.lock().expect("record").conflicts += 1;
            }
            Err(CommandError::Store(error)) if error.is_retryable() => {
                record.lock().expect("record").unavailable += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => {
                let stream = bus.store().read_stream("account", id, 0, 10_000).await;
                let stream = stream.map(|events| {
                    events
                        .iter()
                        .map(|e| (e.sequence, e.transaction_id))
                        .collect::<Vec<_>>()
                });
                panic!(
                    "command on `{id}` failed: {error}; its stream (sequence, message): {stream:?}"
                )
            }
        }
        assert!(
            Instant::now() < deadline,
            "a command on `{id}` did not go through within 60 s"
        );
    }
}

/// Every event of the log, read to its head (retrying while the cluster,
/// just recovered, elects its leaders).
async fn whole_log(store: &JetStreamStore) -> Vec<outflow::RecordedEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let head = loop {
        match store.head().await {
            Ok(head) => break head,
            Err(error) if error.is_retryable() && Instant::now() < deadline => {}
            Err(error) => panic!("the log's head: {error}"),
        }
    };
    let mut events = Vec::new();
    let mut cursor = Checkpoint::START;
    while cursor < head {
        let batch = match store.read_log(cursor, &LogFilter::all(), 1000).await {
            Ok(batch) => batch,
            Err(error) if error.is_retryable() && Instant::now() < deadline => continue,
            Err(error) => panic!("read the log: {error}"),
        };
        let Some(last) = batch.last() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        cursor = last.checkpoint();
        events.extend(batch);
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_during_appends_from_eight_writers() {
    let mut cluster = OwnCluster::start(3);
    cluster.wait_for_meta_leader(Duration::from_secs(30)).await;
    // Long enough to ride out an election (4-8 s on nats-server 2.9).
    let store = cluster_store(&cluster, Duration::from_secs(15)).await;
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    bus.execute(
        "shared",
        BankCommand::Open {
            owner: "all".into(),
        },
    )
    .await
    .expect("open the shared account");

    // A projection into PostgreSQL, running through the failure.
    let db = common::TestDb::new("jetstream_leader").await;
    let read_models = db.store().await;
    Balances::create_table(read_models.pool())
        .await
        .expect("create account_balances");
    let log: Arc<dyn EventLog> = Arc::new(store.clone());
    let runner = ProjectionRunner::with_log(log, read_models.clone())
        .projection(ProjectionOptions::new(Balances::new()).batch_size(50))
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(2))
        .build()
        .expect("runner");
    let (shutdown, running) = common::start_runner(&runner);

    let record = Arc::new(Mutex::new(Record::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (bus, record, stop, started) =
            (bus.clone(), record.clone(), stop.clone(), started.clone());
        writers.push(tokio::spawn(async move {
            let own = format!("acc-{writer}");
            run_once(
                &bus,
                &own,
                BankCommand::Open { owner: own.clone() },
                &record,
            )
            .await;
            let mut round = 0i64;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                run_once(&bus, &own, BankCommand::Deposit { amount: round }, &record).await;
                run_once(&bus, "shared", BankCommand::Deposit { amount: 1 }, &record).await;
                started.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    while started.load(Ordering::SeqCst) < 40 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = leader(&store, &cluster).await;
    let before = record.lock().expect("record").acknowledged.len();
    let killed_at = Instant::now();
    cluster.kill(victim);
    // Writes resume after the re-election, on the two nodes left.
    let resumed = loop {
        let first_after = record
            .lock()
            .expect("record")
            .acked_at
            .iter()
            .copied()
            .filter(|t| *t > killed_at + Duration::from_millis(50))
            .min();
        if let Some(at) = first_after {
            break at;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "no write went through within 60 s of killing the leader\n{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pause = resumed - killed_at;
    let new_leader = leader(&store, &cluster).await;
    assert_ne!(new_leader, victim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.expect("a writer panicked");
    }
    let record = Arc::try_unwrap(record)
        .ok()
        .expect("writers are done")
        .into_inner()
        .expect("record");
    let after = record.acknowledged.len() - before;
    println!(
        "leader n{} killed: writes paused {pause:?}, {before} events acknowledged before, {after} after; \
         {} conflicts, {} unavailable answers retried",
        victim + 1,
        record.conflicts,
        record.unavailable
    );
    assert!(after > 0, "writes went on after the kill");
    assert!(
        record.conflicts > 0,
        "8 writers on one account met no conflict"
    );

    // Every acknowledged command exactly once, streams contiguous.
    let log = whole_log(&store).await;
    let ids: Vec<Uuid> = log.iter().map(|e| e.event_id).collect();
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event is in the log twice");
    let acknowledged: HashSet<Uuid> = record.acknowledged.iter().copied().collect();
    assert_eq!(
        acknowledged.len(),
        record.acknowledged.len(),
        "a command was acknowledged twice"
    );
    assert!(
        acknowledged.is_subset(&unique),
        "{} acknowledged events are missing from the log",
        acknowledged.difference(&unique).count()
    );
    // `execute_once` retried every unanswered command until it was
    // acknowledged: nothing else is in the log but the opening.
    assert_eq!(unique.len(), acknowledged.len() + 1);
    let mut streams: HashMap<&str, Vec<u64>> = HashMap::new();
    for event in &log {
        streams
            .entry(event.aggregate_id.as_str())
            .or_default()
            .push(event.sequence);
    }
    for (id, sequences) in &streams {
        assert_eq!(
            sequences,
            &(1..=sequences.len() as u64).collect::<Vec<_>>(),
            "`{id}` is not contiguous in log order"
        );
    }

    // The projection equals a fold of the log.
    let last = record.checkpoints.iter().max().copied().expect("commands");
    runner
        .wait_for(last, &["account_balances"], Duration::from_secs(60))
        .await
        .expect("the projection catches up");
    let mut expected = Vec::new();
    for id in streams.keys() {
        let events: Vec<BankEvent> = log
            .iter()
            .filter(|e| e.aggregate_id == *id)
            .map(|e| e.decode_payload::<BankAccount>().expect("decode"))
            .collect();
        let mut row = BalanceRow::default();
        Balances::fold(&events, id, &mut row);
        expected.push(row);
    }
    expected.sort_by(|a, b| a.account_id.cmp(&b.account_id));
    let rows = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(rows, expected, "the read model is the fold of the log");
    common::stop_runner(shutdown, running).await;

    // The killed node comes back and catches up.
    cluster.start_node(victim);
}

fn deposit(id: &str, expected: u64) -> AppendRequest {
    AppendRequest {
        aggregate_type: "account".into(),
        aggregate_id: id.into(),
        expected_version: expected,
        events: vec![common::deposit_event(expected + 1)],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_down_writes_go_on_two_down_unavailable_then_recovery() {
    let mut cluster = OwnCluster::start(3);
    cluster.wait_for_meta_leader(Duration::from_secs(30)).await;
    let timeout = Duration::from_secs(3);
    let store = cluster_store(&cluster, timeout).await;
    let mut acknowledged = Vec::new();
    let mut version = 0;
    let append = |store: JetStreamStore, version: u64| async move {
        store.append(deposit("steady", version)).await
    };
    for _ in 0..5 {
        let written = append(store.clone(), version).await.expect("append");
        acknowledged.extend(written.iter().map(|e| e.event_id));
        version += 1;
    }

    // One node down (not the leader): writes go on at once.
    let leader_node = leader(&store, &cluster).await;
    let follower = (leader_node + 1) % 3;
    cluster.kill(follower);
    for _ in 0..5 {
        let written = append(store.clone(), version)
            .await
            .expect("an append with one node down");
        acknowledged.extend(written.iter().map(|e| e.event_id));
        version += 1;
    }

    // Two down: no majority, no leader. Appends fail as unavailable within
    // the store's timeout (and a little).
    let second = (leader_node + 2) % 3;
    cluster.kill(second);
    let began = Instant::now();
    let refused = append(store.clone(), version).await;
    let took = began.elapsed();
    match &refused {
        Err(error) if error.is_unavailable() => {}
        other => panic!("expected Unavailable with two of three nodes down, got {other:?}"),
    }
    assert!(
        took < timeout + Duration::from_secs(2),
        "the unavailable error took {took:?}"
    );
    println!("two nodes down: append refused as unavailable after {took:?}");

    // A node returns: writes resume (the refused append may or may not have
    // been stored, so the next expects whatever the stream holds).
    cluster.start_node(second);
    let resumed_at = Instant::now();
    let written = loop {
        let (current, _) = match store.load("account", "steady", false).await {
            Ok(loaded) => (loaded.events.last().map_or(0, |e| e.sequence), ()),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match append(store.clone(), current).await {
            Ok(written) => break written,
            Err(error) if error.is_retryable() => {
                assert!(
                    resumed_at.elapsed() < Duration::from_secs(60),
                    "no write went through within 60 s of a node's return: {error}\n{}",
                    cluster.log_tails()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("append after recovery: {error}"),
        }
    };
    println!(
        "a node back: writes resumed after {:?}",
        resumed_at.elapsed()
    );
    acknowledged.extend(written.iter().map(|e| e.event_id));

    // Nothing acknowledged was lost.
    let log = whole_log(&store).await;
    let logged: HashSet<Uuid> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(logged.len(), log.len(), "an event is in the log twice");
    for id in &acknowledged {
        assert!(logged.contains(id), "acknowledged event {id} was lost");
    }
    let sequences: Vec<u64> = log.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=log.len() as u64).collect::<Vec<_>>());
    cluster.start_node(follower);
}

/// `leaders()` answers partition by partition: with three one-replica
/// partition streams and the server of one of them killed, that partition
/// has no leader and the others still name theirs, within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_answer_per_partition_while_a_server_is_down() {
    let mut cluster = OwnCluster::start(3);
    cluster.wait_for_meta_leader(Duration::from_secs(30)).await;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .connect(cluster.url_list())
        .await
        .expect("connect to the cluster");
    let store = JetStreamStore::builder(client)
        .prefix("per_partition")
        .partitions(3)
        .replicas(1)
        // Long enough to ride out a meta-leader election if the victim led.
        .timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("a store of one-replica partitions");
    let leaders = store.leaders().await.expect("leaders");
    let first = leaders[0].clone().expect("partition 0 has a leader");
    let victim = cluster.node_index(&first).expect("a node of the cluster");
    cluster.kill(victim);
    let after = store
        .leaders()
        .await
        .expect("an answer while a server is down");
    assert_eq!(after.len(), 3);
    assert_eq!(after[0], None, "{after:?}");
    for (partition, leader) in leaders.iter().enumerate().skip(1) {
        if leader.as_deref() != Some(first.as_str()) {
            assert_eq!(
                &after[partition], leader,
                "partition {partition}: {after:?}"
            );
        }
    }
}

/// `build()` keeps its promise about time: with every server of the
/// cluster stalled (SIGSTOP) for 3 s while it provisions its streams and
/// bucket, it tries again until its 10 s timeout and succeeds, and the
/// store works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_rides_out_a_stalled_cluster() {
    let cluster = OwnCluster::start(3);
    cluster.wait_for_meta_leader(Duration::from_secs(30)).await;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .connect(cluster.url_list())
        .await
        .expect("connect to the cluster");
    for i in 0..3 {
        cluster.pause(i);
    }
    let building = tokio::spawn(
        JetStreamStore::builder(client)
            .prefix("stalled")
            .partitions(2)
            .replicas(3)
            .timeout(Duration::from_secs(10))
            .build(),
    );
    // The outage the build must ride out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..3 {
        cluster.resume(i);
    }
    let store = building.await.expect("the build task").unwrap_or_else(|e| {
        panic!(
            "build gave up during the stall: {e}\n{}",
            cluster.log_tails()
        )
    });
    let bus = CommandBus::<BankAccount, _>::new(store, ());
    bus.execute("after-stall", BankCommand::Open { owner: "Al".into() })
        .await
        .expect("a command after the stall");
}

/// `status()` keeps its promise about time while the log is down: with
/// every server of the cluster stalled (SIGSTOP), it answers after its own
/// patience (a second per part) — the units from the projection store
/// (SQLite here), the log's error in each — instead of waiting out the
/// store's 60 s timeout and failing; after the servers resume, the lag is
/// counted again. (The test allows 30 s for the answer: on a loaded machine
/// the timers run late; before, it took the store's whole timeout and then
/// failed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_at_once_while_the_log_is_down() {
    let cluster = OwnCluster::start(3);
    cluster.wait_for_meta_leader(Duration::from_secs(30)).await;
    let store = cluster_store(&cluster, Duration::from_secs(60)).await;
    let dir = common::TestDir::new("js_status_down");
    let read_models = dir.sqlite().await;
    example_accounts::projections::SqliteBalances::create_table(read_models.writer())
        .await
        .expect("create account_balances");
    let runner = ProjectionRunner::with_log(Arc::new(store.clone()), read_models.clone())
        .projection(ProjectionOptions::new(
            example_accounts::projections::SqliteBalances::new(),
        ))
        .build()
        .expect("runner");
    runner.setup().await.expect("setup");
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    bus.execute("before", BankCommand::Open { owner: "Al".into() })
        .await
        .expect("a command");
    let healthy = runner.status().await.expect("status");
    assert_eq!(healthy.len(), 1);
    assert_eq!(healthy[0].log_error, None);
    assert_eq!(healthy[0].lag_events, 1, "nothing ran the projection yet");

    for i in 0..3 {
        cluster.pause(i);
    }
    let asked = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), runner.status()).await;
    let took = asked.elapsed();
    for i in 0..3 {
        cluster.resume(i);
    }
    let statuses = answer
        .unwrap_or_else(|_| panic!("status did not answer within 30 s while the log was down"))
        .expect("the units come from the projection store, which is up");
    assert_eq!(statuses.len(), 1, "{statuses:?} after {took:?}");
    let error = statuses[0]
        .log_error
        .as_deref()
        .unwrap_or_else(|| panic!("the log's error is in the status: {statuses:?}"));
    assert!(error.contains("no answer within"), "{error}");
    assert_eq!(statuses[0].lag_events, 0);

    // Back: counted again.
    common::eventually("the lag counted again", Duration::from_secs(30), || {
        let runner = runner.clone();
        async move {
            let status = runner.status().await.map_err(|e| e.to_string())?;
            if status[0].log_error.is_none() && status[0].lag_events == 1 {
                Ok(())
            } else {
                Err(format!("{status:?}"))
            }
        }
    })
    .await;
}
