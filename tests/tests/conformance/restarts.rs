//! Restarts and rolling deploys are invisible: a runner stopped cleanly
//! deregisters its node and frees its leases, so the next process — with a
//! new random node id — owns every unit at its first heartbeat, not after
//! the lease TTL; with three nodes restarted one at a time under load, every
//! event is applied once and `wait_for` keeps answering.

use outflow_tests as common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::{AppendRequest, Backend, EventStore, RecordedEvent};

/// Records every event it handles, per projection, to count applications.
struct Recording<S> {
    name: String,
    seen: Arc<Mutex<Vec<(String, uuid::Uuid)>>>,
    _store: std::marker::PhantomData<fn() -> S>,
}

#[async_trait]
impl<S: Backend> Projection<S> for Recording<S> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        let mut seen = self.seen.lock().expect("the record");
        seen.extend(events.iter().map(|e| (self.name.clone(), e.event_id)));
        Ok(())
    }
}

const NAMES: [&str; 6] = ["p1", "p2", "p3", "p4", "p5", "p6"];

/// A runner with a long lease (30 s) and a short heartbeat: a restart that
/// waited for the lease would show.
fn runner<S: Backend>(
    store: &S,
    seen: &Arc<Mutex<Vec<(String, uuid::Uuid)>>>,
) -> ProjectionRunner<S> {
    let mut builder = ProjectionRunner::builder(store.clone())
        .lease_ttl(Duration::from_secs(30))
        .heartbeat_interval(Duration::from_millis(300));
    for name in NAMES {
        builder = builder.projection(ProjectionOptions::new(Recording::<S> {
            name: name.to_owned(),
            seen: seen.clone(),
            _store: std::marker::PhantomData,
        }));
    }
    builder.build().expect("the runner")
}

/// Appends one event; returns its checkpoint (the head may not show it yet
/// while another test's transaction is open on the server).
async fn append<S: EventStore>(store: &S, n: u64) -> outflow::Checkpoint {
    let written = store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "a".into(),
            expected_version: n,
            events: vec![common::deposit_event(1)],
        })
        .await
        .expect("append");
    outflow::Checkpoint::new(written[0].transaction_id, written[0].position)
}

async fn quick_restarts<S: Backend>(store: S) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    runner(&store, &seen).setup().await.expect("setup");
    for round in 0..5u64 {
        let runner = runner(&store, &seen);
        let (stop, running) = common::start_runner(&runner);
        let head = append(&store, round).await;
        // Well inside the 30 s lease: only a restart that did not wait for
        // the previous node's leases gets here.
        runner
            .wait_for(head, &NAMES, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| {
                panic!("round {round}: the restarted runner did not catch up: {e}")
            });
        common::stop_runner(stop, running).await;
    }
    let seen = seen.lock().expect("the record").clone();
    assert_eq!(
        seen.len(),
        5 * NAMES.len(),
        "every event applied once per projection"
    );
}

/// Three nodes; each in turn stopped and replaced by a new one while a
/// writer appends without pause: every event reaches every projection
/// once, and after each replacement the projections reach the head well
/// inside the lease (the longest wait is printed).
async fn rolling_deploy<S: Backend>(store: S) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    runner(&store, &seen).setup().await.expect("setup");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let runner = runner(&store, &seen);
        let (stop, running) = common::start_runner(&runner);
        nodes.push((runner, stop, running));
    }
    // The load: appends one after another for the whole deploy.
    let writing = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn({
        let store = store.clone();
        let writing = writing.clone();
        async move {
            let mut appended = 0u64;
            while !writing.is_cancelled() {
                append(&store, appended).await;
                appended += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            appended
        }
    });
    let mut longest = Duration::ZERO;
    for step in 0..6 {
        let (_, stop, running) = nodes.remove(0);
        common::stop_runner(stop, running).await;
        let runner = runner(&store, &seen);
        let (stop, running) = common::start_runner(&runner);
        nodes.push((runner, stop, running));
        let head = store.committed_head().await.expect("head");
        let started = std::time::Instant::now();
        nodes[0]
            .0
            .wait_for(head, &NAMES, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("step {step}: a projection stalled in the deploy: {e}"));
        longest = longest.max(started.elapsed());
    }
    writing.cancel();
    let appended = writer.await.expect("the writer");
    let head = store.committed_head().await.expect("head");
    nodes[0]
        .0
        .wait_for(head, &NAMES, Duration::from_secs(10))
        .await
        .expect("caught up after the deploy");
    for (_, stop, running) in nodes {
        common::stop_runner(stop, running).await;
    }
    let seen = seen.lock().expect("the record").clone();
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "an event was applied twice");
    assert_eq!(seen.len() as u64, appended * NAMES.len() as u64);
    eprintln!(
        "rolling deploy: 6 replacements, {appended} events appended meanwhile, each applied once \
         per projection; longest wait for the head after a replacement {longest:?}"
    );
}

/// A projection that takes its time with every batch.
struct Slow<S> {
    handled: Arc<Mutex<u64>>,
    per_batch: Duration,
    _store: std::marker::PhantomData<fn() -> S>,
}

#[async_trait]
impl<S: Backend> Projection<S> for Slow<S> {
    fn name(&self) -> &str {
        "slow"
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        tokio::time::sleep(self.per_batch).await;
        *self.handled.lock().expect("count") += events.len() as u64;
        Ok(())
    }
}

fn slow_runner<S: Backend>(
    store: &S,
    handled: &Arc<Mutex<u64>>,
    per_batch: Duration,
    drain: Option<Duration>,
) -> ProjectionRunner<S> {
    let mut builder = ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(300))
        .projection(
            ProjectionOptions::new(Slow::<S> {
                handled: handled.clone(),
                per_batch,
                _store: std::marker::PhantomData,
            })
            .batch_size(1),
        );
    if let Some(bound) = drain {
        builder = builder.drain_on_shutdown(bound);
    }
    builder.build().expect("the runner")
}

/// With `drain_on_shutdown`, a node stopped with a backlog handles all of
/// it before it stops (the next node finds nothing to do); without it, it
/// stops after the batch in flight; and the bound is kept: a backlog that
/// would take minutes does not hold the shutdown.
async fn drain_on_shutdown<S: Backend>(store: S) {
    for n in 0..40 {
        append(&store, n).await;
    }
    let head = store.committed_head().await.expect("head");

    // Without a drain: stops after the batch in flight.
    let handled = Arc::new(Mutex::new(0u64));
    let runner = slow_runner(&store, &handled, Duration::from_millis(50), None);
    runner.setup().await.expect("setup");
    let (stop, running) = common::start_runner(&runner);
    common::eventually("the first batches", Duration::from_secs(30), || {
        let n = *handled.lock().expect("count");
        async move {
            if n >= 2 {
                Ok(())
            } else {
                Err(format!("{n}"))
            }
        }
    })
    .await;
    common::stop_runner(stop, running).await;
    let without = *handled.lock().expect("count");
    assert!(
        without < 40,
        "the backlog was not drained without the option"
    );

    // With one: the whole backlog first.
    let runner = slow_runner(
        &store,
        &handled,
        Duration::from_millis(50),
        Some(Duration::from_secs(60)),
    );
    let (stop, running) = common::start_runner(&runner);
    common::eventually(
        "a batch of the second node",
        Duration::from_secs(30),
        || {
            let n = *handled.lock().expect("count");
            async move {
                if n > without {
                    Ok(())
                } else {
                    Err(format!("{n}"))
                }
            }
        },
    )
    .await;
    common::stop_runner(stop, running).await;
    assert_eq!(*handled.lock().expect("count"), 40, "drained to the head");
    let units = store.units(Some("slow")).await.expect("units");
    assert_eq!(units[0].checkpoint, head, "the checkpoint is at the head");
    assert!(!units[0].lease_valid, "the lease was given back");

    // The bound: a second per event and 40 more events; a 1 s drain.
    for n in 40..80 {
        append(&store, n).await;
    }
    let runner = slow_runner(
        &store,
        &handled,
        Duration::from_secs(1),
        Some(Duration::from_secs(1)),
    );
    let (stop, running) = common::start_runner(&runner);
    common::eventually("a batch of the third node", Duration::from_secs(30), || {
        let n = *handled.lock().expect("count");
        async move {
            if n > 40 {
                Ok(())
            } else {
                Err(format!("{n}"))
            }
        }
    })
    .await;
    // `stop_runner` allows 30 s: the 40 s backlog is cut by the bound.
    common::stop_runner(stop, running).await;
    assert!(*handled.lock().expect("count") < 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_on_shutdown_on_postgres() {
    let db = common::TestDb::new("drain").await;
    drain_on_shutdown(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_on_shutdown_on_sqlite() {
    let dir = common::TestDir::new("drain");
    drain_on_shutdown(dir.sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_restarts_on_postgres() {
    let db = common::TestDb::new("quick_restarts").await;
    quick_restarts(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_restarts_on_sqlite() {
    let dir = common::TestDir::new("quick_restarts");
    quick_restarts(dir.sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploy_on_postgres() {
    let db = common::TestDb::new("rolling_deploy").await;
    rolling_deploy(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploy_on_sqlite() {
    let dir = common::TestDir::new("rolling_deploy");
    rolling_deploy(dir.sqlite().await).await;
}
