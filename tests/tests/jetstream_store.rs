//! The JetStream event store with read models in SQL: commands from
//! concurrent writers into 4 partition streams, projected into PostgreSQL
//! and SQLite exactly once (compared with a fold of each aggregate's
//! stream), with `wait_for`, status, lag, a restart, a rebuild and a parked
//! poison message working as on the other backends; and a publish whose
//! acknowledgement is lost on the wire, retried without a second copy.
//!
//! Needs `NATS_URL` (scripts/test.sh starts the server) and `DATABASE_URL`.

use outflow_tests as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use example_accounts::projections::{BalanceRow, Balances, SqliteBalances};
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::projection::ProjectionOptions;
use outflow::runner::{ProjectionRunner, WaitError};
use outflow::store::jetstream::JetStreamStore;
use outflow::store::ProjectionState;
use outflow::{AppendRequest, Checkpoint, CommandBus, EventLog, EventStore, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WRITERS: usize = 8;
const ACCOUNTS_PER_WRITER: usize = 5;

/// Every account's events, as the store has them, folded into rows.
async fn fold_of(store: &JetStreamStore, accounts: &[String]) -> Vec<BalanceRow> {
    let mut rows = Vec::new();
    for id in accounts {
        let events: Vec<BankEvent> = store
            .read_stream("account", id, 0, usize::MAX)
            .await
            .expect("read an account's stream")
            .iter()
            .map(|e| e.decode_payload::<BankAccount>().expect("decode"))
            .collect();
        let mut row = BalanceRow::default();
        Balances::fold(&events, id, &mut row);
        rows.push(row);
    }
    rows.sort_by(|a, b| a.account_id.cmp(&b.account_id));
    rows
}

/// `WRITERS` tasks, each opening its accounts and moving money on them,
/// all also depositing on one shared account (retrying on conflicts).
/// Returns the accounts and the checkpoint of every command.
async fn write(
    bus: &Arc<CommandBus<BankAccount, JetStreamStore>>,
    round: usize,
) -> (Vec<String>, Vec<Checkpoint>) {
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut checkpoints = Vec::new();
            let mut accounts = Vec::new();
            for k in 0..ACCOUNTS_PER_WRITER {
                let id = format!("acc-{writer}-{k}");
                if round == 0 {
                    let opened = bus
                        .execute(
                            &id,
                            BankCommand::Open {
                                owner: format!("owner {writer}"),
                            },
                        )
                        .await
                        .expect("open");
                    checkpoints.push(opened.checkpoint().expect("written"));
                }
                for amount in [100, 250] {
                    let done = bus
                        .execute(
                            &id,
                            BankCommand::Deposit {
                                amount: amount + round as i64,
                            },
                        )
                        .await
                        .expect("deposit");
                    checkpoints.push(done.checkpoint().expect("written"));
                }
                let done = bus
                    .execute(&id, BankCommand::Withdraw { amount: 30 })
                    .await
                    .expect("withdraw");
                checkpoints.push(done.checkpoint().expect("written"));
                accounts.push(id);
            }
            // Every writer on one account: conflicts, retried.
            loop {
                match bus
                    .execute("shared", BankCommand::Deposit { amount: 1 })
                    .await
                {
                    Ok(done) => {
                        checkpoints.push(done.checkpoint().expect("written"));
                        break;
                    }
                    Err(error) if error.is_conflict() => continue,
                    Err(error) => panic!("shared deposit: {error}"),
                }
            }
            (accounts, checkpoints)
        }));
    }
    let mut accounts = vec!["shared".to_owned()];
    let mut checkpoints = Vec::new();
    for task in tasks {
        let (a, c) = task.await.expect("a writer panicked");
        accounts.extend(a);
        checkpoints.extend(c);
    }
    accounts.sort();
    (accounts, checkpoints)
}

/// A runner reading `log` into `read_models`, with a short heartbeat and
/// lease so tests do not wait for units to be claimed.
fn fast_runner<S: outflow::ProjectionStore>(
    log: Arc<dyn EventLog>,
    read_models: &S,
    projection: ProjectionOptions<S>,
) -> ProjectionRunner<S> {
    ProjectionRunner::with_log(log, read_models.clone())
        .projection(projection)
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(2))
        .build()
        .expect("runner")
}

async fn open_shared(bus: &CommandBus<BankAccount, JetStreamStore>) {
    bus.execute(
        "shared",
        BankCommand::Open {
            owner: "all".into(),
        },
    )
    .await
    .expect("open the shared account");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_partitions_projected_into_postgres() {
    let js = common::jetstream_store(&common::nats_url(), "pg_projection", 4).await;
    let db = common::TestDb::new("jetstream_projection").await;
    let read_models = db.store().await;
    Balances::create_table(read_models.pool())
        .await
        .expect("create account_balances");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(js.clone(), ()));
    open_shared(&bus).await;

    // A projection asking for a partition count the log does not have is
    // refused; the default follows the store's 4.
    let log: Arc<dyn EventLog> = Arc::new(js.clone());
    let refused = ProjectionRunner::with_log(log.clone(), read_models.clone())
        .projection(ProjectionOptions::new(Balances::new()).partitions(3))
        .build();
    assert!(
        matches!(refused, Err(StoreError::Config(_))),
        "3 partitions on a 4-partition log: {refused:?}"
    );
    let runner = fast_runner(
        log,
        &read_models,
        ProjectionOptions::new(Balances::new()).batch_size(16),
    );
    let (shutdown, running) = common::start_runner(&runner);

    // Writers while the runner tails the four streams.
    let (accounts, checkpoints) = write(&bus, 0).await;
    assert_eq!(accounts.len(), WRITERS * ACCOUNTS_PER_WRITER + 1);
    let partitions: std::collections::BTreeSet<u32> =
        accounts.iter().map(|a| js.partition_of(a)).collect();
    assert_eq!(
        partitions.len(),
        4,
        "the accounts spread over every partition"
    );
    for checkpoint in &checkpoints {
        runner
            .wait_for(*checkpoint, &["account_balances"], Duration::from_secs(30))
            .await
            .expect("every command's events reach PostgreSQL");
    }
    let rows = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "read model = fold of the log"
    );

    // Status: one unit per stream partition, caught up.
    let statuses = runner.status().await.expect("status");
    assert_eq!(statuses.len(), 4);
    let total: u64 = statuses.iter().map(|s| s.processed).sum();
    let events: u64 = rows.iter().map(|r| r.events as u64).sum();
    assert_eq!(total, events, "every event processed once");
    for status in &statuses {
        assert_eq!(status.partitions, 4);
        assert_eq!(status.lag_events, 0, "{status:?}");
        assert_eq!(status.state, ProjectionState::Live);
    }

    // Stopped, more commands, restarted: lag shows, then it catches up
    // without applying anything twice.
    common::stop_runner(shutdown, running).await;
    let (_, more) = write(&bus, 1).await;
    let lagging: u64 = runner
        .status()
        .await
        .expect("status")
        .iter()
        .map(|s| s.lag_events)
        .sum();
    assert_eq!(
        lagging as usize,
        more.len(),
        "lag counts the unprojected events"
    );
    let (shutdown, running) = common::start_runner(&runner);
    for checkpoint in &more {
        runner
            .wait_for(*checkpoint, &["account_balances"], Duration::from_secs(30))
            .await
            .expect("caught up after the restart");
    }
    let rows = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "read model = fold after the restart"
    );

    // A rebuild replays the four partitions into an emptied table.
    let mut progress = runner.rebuild("account_balances").await.expect("rebuild");
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if progress.borrow_and_update().is_complete() {
                break;
            }
            progress.changed().await.expect("progress");
        }
    })
    .await
    .expect("the rebuild completes");
    assert_eq!(
        progress.borrow().total,
        rows.iter().map(|r| r.events as u64).sum::<u64>()
    );
    for checkpoint in checkpoints.iter().chain(&more) {
        runner
            .wait_for(*checkpoint, &["account_balances"], Duration::from_secs(30))
            .await
            .expect("rebuilt");
    }
    let rebuilt = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(rebuilt, rows, "the rebuild gives the same read model");
    common::stop_runner(shutdown, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stream_projected_into_sqlite_with_a_poison_message_parked() {
    let js = common::jetstream_store(&common::nats_url(), "sqlite_projection", 1).await;
    let dir = common::TestDir::new("jetstream_sqlite");
    let read_models = dir.sqlite().await;
    SqliteBalances::create_table(read_models.writer())
        .await
        .expect("create account_balances");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(js.clone(), ()));
    open_shared(&bus).await;
    let log: Arc<dyn EventLog> = Arc::new(js.clone());
    let runner = fast_runner(
        log,
        &read_models,
        ProjectionOptions::new(SqliteBalances::new()).batch_size(10),
    );
    let (shutdown, running) = common::start_runner(&runner);
    let (accounts, checkpoints) = write(&bus, 0).await;
    let last = checkpoints.iter().max().copied().expect("commands ran");
    runner
        .wait_for(last, &["account_balances"], Duration::from_secs(30))
        .await
        .expect("every command's events reach SQLite");
    let rows = SqliteBalances::rows(read_models.writer())
        .await
        .expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "read model = fold of the log"
    );

    // A message on an account's subject that no Outflow writer wrote (not
    // an append's JSON): parked, named in the wait's error, and the events
    // after it are handled.
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    let raw = async_nats::jetstream::new(client);
    raw.publish(js.subject("account", "poison"), "not json".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let after = bus
        .execute("acc-0-0", BankCommand::Deposit { amount: 5 })
        .await
        .expect("deposit after the poison");
    let waited = runner
        .wait_for(
            after.checkpoint().expect("written"),
            &["account_balances"],
            Duration::from_secs(30),
        )
        .await;
    match waited {
        Err(WaitError::Parked { event, .. }) => assert_eq!(event.aggregate_id, "poison"),
        other => panic!("expected the poison message parked, got {other:?}"),
    }
    let parked = runner
        .dead_letters("account_balances")
        .await
        .expect("dead letters");
    assert_eq!(parked.len(), 1);
    let rows = SqliteBalances::rows(read_models.writer())
        .await
        .expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "the deposit after it was applied"
    );
    let status = common::status_of(&runner, "account_balances").await;
    assert_eq!(status.parked, 1);
    assert_eq!(status.lag_events, 0);
    common::stop_runner(shutdown, running).await;
}

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

/// Two nodes on one store (two connections): a runner on the first, whose
/// readers would look only every 60 s by themselves, sees an append made
/// through the second at once, woken by the second's signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_append_wakes_the_readers() {
    let writer = common::jetstream_store(&common::nats_url(), "wake", 1).await;
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    let reader = JetStreamStore::builder(client)
        .prefix(writer.prefix())
        .poll_interval(Duration::from_secs(60))
        .build()
        .await
        .expect("the same store on another connection");
    let dir = common::TestDir::new("jetstream_wake");
    let read_models = dir.sqlite().await;
    SqliteBalances::create_table(read_models.writer())
        .await
        .expect("create account_balances");
    let log: Arc<dyn EventLog> = Arc::new(reader);
    let runner = fast_runner(
        log,
        &read_models,
        ProjectionOptions::new(SqliteBalances::new()),
    );
    let (shutdown, running) = common::start_runner(&runner);
    let bus = CommandBus::<BankAccount, _>::new(writer.clone(), ());
    // The runner is idle, waiting, before the appends.
    common::started(&runner, &["account_balances"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..3 {
        let done = bus
            .execute(
                &format!("woken-{round}"),
                BankCommand::Open { owner: "x".into() },
            )
            .await
            .expect("open");
        runner
            .wait_for(
                done.checkpoint().expect("written"),
                &["account_balances"],
                Duration::from_secs(10),
            )
            .await
            .expect("the other node's append is seen long before the 60 s poll");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    common::stop_runner(shutdown, running).await;
}

/// A one-partition store is one total order: a projection split into 3
/// partitions runs on it as on the SQL backends (each unit reads the stream
/// and keeps its aggregates), and equals the fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_projection_on_one_stream() {
    let js = common::jetstream_store(&common::nats_url(), "split", 1).await;
    let db = common::TestDb::new("jetstream_split").await;
    let read_models = db.store().await;
    Balances::create_table(read_models.pool())
        .await
        .expect("create account_balances");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(js.clone(), ()));
    open_shared(&bus).await;
    let log: Arc<dyn EventLog> = Arc::new(js.clone());
    let runner = fast_runner(
        log,
        &read_models,
        ProjectionOptions::new(Balances::new()).partitions(3),
    );
    let (shutdown, running) = common::start_runner(&runner);
    let (accounts, checkpoints) = write(&bus, 0).await;
    let last = checkpoints.iter().max().copied().expect("commands ran");
    runner
        .wait_for(last, &["account_balances"], Duration::from_secs(30))
        .await
        .expect("every partition of the projection passes the last command");
    assert_eq!(runner.status().await.expect("status").len(), 3);
    let rows = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "read model = fold of the log"
    );
    common::stop_runner(shutdown, running).await;
}

/// The partitions' leaders are spread over the cluster: 6 partition streams
/// on 3 servers, each server leads 2 once the store is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leaders_are_spread_over_the_cluster() {
    let store = common::jetstream_store(&common::nats_cluster_url(), "spread", 6).await;
    let leaders = store.leaders().await.expect("leaders");
    let mut led: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for leader in &leaders {
        *led.entry(leader.clone().expect("every stream has a leader"))
            .or_default() += 1;
    }
    assert_eq!(led.len(), 3, "every server leads partitions: {leaders:?}");
    assert!(led.values().all(|&n| n == 2), "2 each: {led:?}");
    // Asking again changes nothing when the leaders are spread.
    assert_eq!(store.spread_leaders().await.expect("spread"), leaders);
}

/// Four partitions on three servers spread by the floor/ceiling rule,
/// 2/1/1: no server idle while another leads two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_partition_leaders_leave_no_server_idle() {
    let store = common::jetstream_store(&common::nats_cluster_url(), "spread4", 4).await;
    let leaders = store.leaders().await.expect("leaders");
    let mut led: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for leader in &leaders {
        *led.entry(leader.clone().expect("every stream has a leader"))
            .or_default() += 1;
    }
    assert_eq!(led.len(), 3, "every server leads a partition: {leaders:?}");
    let mut counts: Vec<usize> = led.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 1, 2], "{led:?}");
}

/// The mistakes a user is most likely to make are loud: a server without
/// JetStream gives an infrastructure error naming it, no server at all an
/// `Unavailable` after the timeout, and a store opened with another
/// partition count than its data a configuration error naming the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_jetstream_or_no_server_is_a_loud_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let bin = std::env::var("OUTFLOW_NATS_BIN").expect(
        "OUTFLOW_NATS_BIN is not set: run the tests with scripts/test.sh, which finds nats-server",
    );
    let mut plain = std::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server without JetStream");
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = async_nats::connect(&url).await.expect("connect");
    let refused = JetStreamStore::builder(client)
        .timeout(Duration::from_secs(2))
        .build()
        .await;
    let _ = plain.kill();
    let _ = plain.wait();
    match refused {
        Err(error) => {
            assert_eq!(
                error.kind(),
                outflow::ErrorKind::Infrastructure,
                "{error:?}"
            );
            let text = outflow::error::error_chain(&error).to_lowercase();
            assert!(text.contains("jetstream"), "{text}");
        }
        Ok(_) => panic!("a store on a server without JetStream"),
    }

    // Nothing listens there any more.
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(&url)
        .await
        .expect("a client that connects in the background");
    let began = std::time::Instant::now();
    match JetStreamStore::builder(client)
        .timeout(Duration::from_secs(2))
        .build()
        .await
    {
        Err(error) => assert!(error.is_unavailable(), "{error:?}"),
        Ok(_) => panic!("a store without a server"),
    }
    assert!(began.elapsed() < Duration::from_secs(10));

    // Another partition count than the data's.
    let store = common::jetstream_store(&common::nats_url(), "count", 2).await;
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    match JetStreamStore::builder(client)
        .prefix(store.prefix())
        .partitions(3)
        .build()
        .await
    {
        Err(StoreError::Config(error)) => {
            assert!(
                error.to_string().contains("created with 2 partition"),
                "{error}"
            )
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    let third = format!("{}_2", store.prefix().to_uppercase());
    assert!(
        async_nats::jetstream::new(client)
            .get_stream(&third)
            .await
            .is_err(),
        "the refused open created no stream"
    );
}
