//! Wake-ups are never lost, even on a loaded machine: every cross-node wake
//! path (and the in-process ones) is run many times while busy threads keep
//! every core occupied, with a poll interval of a minute, so that an append
//! the reader did not see at once shows as a round that waits for the poll.
//!
//! `WAKE_STRESS_ROUNDS` sets the rounds per path (default 150); the soak
//! variant runs thousands.

use outflow_tests as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outflow::outbox::{Outbox, OutboxMessage, OutboxMessageRecord, OutboxSink};
use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::{AppendRequest, Backend, Checkpoint, EventLog, EventStore, RecordedEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

/// Longer than any wake-up may take, far shorter than the poll interval.
const SEEN_WITHIN: Duration = Duration::from_secs(10);
/// Only a signal (or a re-check it scheduled) wakes a reader in time.
const POLL: Duration = Duration::from_secs(60);

fn rounds() -> usize {
    std::env::var("WAKE_STRESS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(150)
}

/// Busy threads on every core (and one more) until dropped.
struct CpuLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuLoad {
    fn start() -> CpuLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..=cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for i in 0..10_000u64 {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                        }
                    }
                })
            })
            .collect();
        CpuLoad { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A projection that only counts: the checkpoint is what the test waits for.
struct Counting<S> {
    handled: Arc<Mutex<u64>>,
    _store: std::marker::PhantomData<fn() -> S>,
}

#[async_trait]
impl<S: Backend> Projection<S> for Counting<S> {
    fn name(&self) -> &str {
        "wake_stress"
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        *self.handled.lock().expect("count") += events.len() as u64;
        Ok(())
    }
}

fn runner<S: Backend>(log: Arc<dyn EventLog>, read_models: &S) -> ProjectionRunner<S> {
    ProjectionRunner::with_log(log, read_models.clone())
        .projection(ProjectionOptions::new(Counting::<S> {
            handled: Arc::default(),
            _store: std::marker::PhantomData,
        }))
        .heartbeat_interval(Duration::from_millis(300))
        .build()
        .expect("the runner")
}

/// Appends one event per round through `writer` and waits until the runner
/// reading through `log` (poll interval: a minute) has handled it. A round
/// starts at once, or after a short random pause (so the reader is caught
/// in every phase: reading, committing, idle).
async fn stress<W: EventStore, S: Backend>(
    what: &str,
    writer: &W,
    log: Arc<dyn EventLog>,
    read_models: &S,
) {
    let runner = runner(log, read_models);
    runner.setup().await.expect("setup");
    let (stop, running) = common::start_runner(&runner);
    common::started(&runner, &["wake_stress"]).await;
    let mut rng = StdRng::seed_from_u64(11);
    let load = CpuLoad::start();
    let mut slowest = Duration::ZERO;
    for round in 0..rounds() {
        if rng.random_bool(0.5) {
            let pause = Duration::from_millis(rng.random_range(0..30));
            tokio::time::sleep(pause).await;
        }
        let written = writer
            .append(AppendRequest {
                aggregate_type: "account".into(),
                aggregate_id: format!("a{round}"),
                expected_version: 0,
                events: vec![common::deposit_event(1)],
            })
            .await
            .expect("append");
        let target = Checkpoint::new(written[0].transaction_id, written[0].position);
        let started = Instant::now();
        runner
            .wait_for(target, &["wake_stress"], SEEN_WITHIN)
            .await
            .unwrap_or_else(|e| {
                panic!("{what}, round {round}: an append was not seen within {SEEN_WITHIN:?} (the wake-up was lost): {e}")
            });
        slowest = slowest.max(started.elapsed());
    }
    drop(load);
    eprintln!("{what}: {} rounds, slowest {slowest:?}", rounds());
    common::stop_runner(stop, running).await;
}

async fn pg_node(db: &common::TestDb) -> outflow::PostgresStore {
    outflow::PostgresStore::builder(db.pool(5).await)
        .poll_interval(POLL)
        .build()
        .await
        .expect("store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_another_nodes_appends() {
    let db = common::TestDb::new("wake_stress_pg").await;
    let writer = pg_node(&db).await;
    let reader = pg_node(&db).await;
    stress(
        "PostgreSQL, another node",
        &writer,
        Arc::new(reader.clone()),
        &reader,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_this_nodes_appends() {
    let db = common::TestDb::new("wake_stress_pg_local").await;
    let store = pg_node(&db).await;
    stress(
        "PostgreSQL, this node",
        &store,
        Arc::new(store.clone()),
        &store,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_this_process() {
    let dir = common::TestDir::new("wake_stress_sqlite");
    let store = outflow::SqliteStore::builder(dir.file("events.db"))
        .poll_interval(POLL)
        .build()
        .await
        .expect("store");
    stress("SQLite", &store, Arc::new(store.clone()), &store).await;
}

async fn js_node(url: &str, prefix: Option<&str>) -> outflow::store::jetstream::JetStreamStore {
    let client = async_nats::connect(url).await.expect("connect");
    let mut builder = outflow::store::jetstream::JetStreamStore::builder(client)
        .poll_interval(POLL)
        .timeout(Duration::from_secs(10));
    builder = match prefix {
        Some(prefix) => builder.prefix(prefix),
        None => builder.prefix(format!(
            "twake_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
    };
    builder.build().await.expect("a JetStream store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_another_nodes_appends() {
    let url = common::nats_url();
    let writer = js_node(&url, None).await;
    let reader = js_node(&url, Some(writer.prefix())).await;
    let dir = common::TestDir::new("wake_stress_js");
    let read_models = dir.sqlite().await;
    stress(
        "JetStream, another node",
        &writer,
        Arc::new(reader),
        &read_models,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_this_nodes_appends() {
    let store = js_node(&common::nats_url(), None).await;
    let dir = common::TestDir::new("wake_stress_js_local");
    let read_models = dir.sqlite().await;
    stress(
        "JetStream, this node",
        &store,
        Arc::new(store.clone()),
        &read_models,
    )
    .await;
}

/// Tells the test how many messages were delivered.
struct Delivered(watch::Sender<u64>);

#[async_trait]
impl OutboxSink for Delivered {
    async fn deliver(&self, messages: &[OutboxMessageRecord]) -> Result<(), HandlerError> {
        self.0.send_modify(|n| *n += messages.len() as u64);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_on_another_node() {
    let db = common::TestDb::new("wake_stress_outbox").await;
    let writer_store = pg_node(&db).await;
    let relay_store = pg_node(&db).await;
    let writer = Outbox::new(&writer_store).await.expect("writer's outbox");
    let relays = Outbox::new(&relay_store).await.expect("relay's outbox");
    let (delivered, mut count) = watch::channel(0u64);
    let relay = relays
        .relay(Delivered(delivered))
        .node_id("stress-relay")
        .poll_interval(POLL)
        .build()
        .expect("relay");
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let mut rng = StdRng::seed_from_u64(13);
    let load = CpuLoad::start();
    let mut slowest = Duration::ZERO;
    for round in 0..rounds() {
        if rng.random_bool(0.5) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
        }
        writer
            .send(OutboxMessage::new(
                "k",
                "stress",
                serde_json::json!({ "round": round }),
            ))
            .await
            .expect("send");
        let started = Instant::now();
        let wanted = round as u64 + 1;
        let waited = tokio::time::timeout(SEEN_WITHIN, count.wait_for(|n| *n >= wanted))
            .await
            .map(|seen| seen.map(|_| ()));
        match waited {
            Ok(seen) => seen.expect("the relay runs"),
            Err(_) => panic!(
                "outbox, round {round}: a message was not delivered within {SEEN_WITHIN:?} \
                 (the wake-up was lost); delivered {}",
                *count.borrow()
            ),
        }
        slowest = slowest.max(started.elapsed());
    }
    drop(load);
    eprintln!("outbox: {} rounds, slowest {slowest:?}", rounds());
    stop.cancel();
    running
        .await
        .expect("relay task")
        .expect("the relay stops cleanly");
}
