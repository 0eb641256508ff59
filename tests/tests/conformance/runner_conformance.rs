//! The projection runner's conformance suite, one body run on every backend
//! it can read and write: memory, PostgreSQL, SQLite, and JetStream's log
//! with its read models in SQLite and in PostgreSQL. It checks what the
//! runner promises whatever the backend:
//!
//! - **catch-up**: a log written before the runner starts is read to its end;
//! - **live tail**: each later append is handled, and `wait_for` sees it;
//! - **errors and parking**: an event the handler refuses is parked by name,
//!   the events after it are applied, and a wait past it says so;
//! - **failover**: a runner that dies (its task aborted, its leases left to
//!   expire) is replaced by another node, which goes on from the committed
//!   checkpoint;
//! - **rebuild**: the whole log is applied again, and progress reaches its
//!   total;
//! - and throughout, **exactly once**: every handled event is claimed in
//!   the batch's own transaction (the store's inbox), so a batch committed
//!   twice would find its claims taken — none may; and no event is skipped.

use outflow_tests as common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outflow::projection::{HandlerError, OnError, Projection, ProjectionOptions, RetryPolicy};
use outflow::runner::{ProjectionRunner, WaitError};
use outflow::store::ProjectionStore;
use outflow::{AppendRequest, Checkpoint, EventLog, EventStore, RecordedEvent};

const NAME: &str = "conformance";
/// Deposits of at least this amount are refused by the handler.
const POISON: u64 = 1_000;

/// What the projection saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// (generation, event id) of every event handled in a transaction
    /// (committed or not).
    handled: Mutex<HashSet<(u64, uuid::Uuid)>>,
    /// Events whose inbox claim was taken already: a batch committed twice.
    doubled: Mutex<Vec<uuid::Uuid>>,
    /// Bumped by every rebuild (the inbox keys carry it).
    generation: AtomicU64,
}

/// Claims each event in the store's inbox inside the batch's transaction,
/// and refuses deposits of `POISON` or more.
struct Ledger<S> {
    store: S,
    seen: Arc<Seen>,
}

#[async_trait]
impl<S: ProjectionStore> Projection<S> for Ledger<S> {
    fn name(&self) -> &str {
        NAME
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        let generation = self.seen.generation.load(Ordering::SeqCst);
        let mut handled = Vec::new();
        for event in events {
            let amount = event.payload["Deposited"]["amount"]
                .as_u64()
                .ok_or_else(|| HandlerError::data("not a deposit"))?;
            if amount >= POISON {
                return Err(HandlerError::data(format!(
                    "a deposit of {amount} is refused"
                )));
            }
            let key = format!("{generation}:{}", event.event_id);
            if !self.store.inbox_claim(tx, NAME, &key).await? {
                self.seen
                    .doubled
                    .lock()
                    .expect("the record")
                    .push(event.event_id);
            }
            handled.push((generation, event.event_id));
        }
        self.seen
            .handled
            .lock()
            .expect("the record")
            .extend(handled);
        Ok(())
    }

    async fn reset(&self, _tx: &mut S::Transaction) -> Result<(), HandlerError> {
        self.seen.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn runner<S: ProjectionStore>(
    log: &Arc<dyn EventLog>,
    store: &S,
    seen: &Arc<Seen>,
) -> ProjectionRunner<S> {
    ProjectionRunner::with_log(log.clone(), store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(2))
        .projection(
            ProjectionOptions::new(Ledger {
                store: store.clone(),
                seen: seen.clone(),
            })
            .batch_size(25)
            .on_error(OnError::Park)
            .retry(RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            }),
        )
        .build()
        .expect("the runner")
}

/// Appends `amounts` as deposits to one stream; returns the events' ids
/// and the checkpoint of the last.
async fn append<W: EventStore>(
    writer: &W,
    stream: &str,
    version: &mut u64,
    amounts: &[u64],
) -> (Vec<uuid::Uuid>, Checkpoint) {
    let events: Vec<_> = amounts.iter().map(|a| common::deposit_event(*a)).collect();
    let ids = events.iter().map(|e| e.event_id).collect();
    let written = writer
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: stream.into(),
            expected_version: *version,
            events,
        })
        .await
        .expect("append");
    *version += amounts.len() as u64;
    let last = written.last().expect("written");
    (ids, Checkpoint::new(last.transaction_id, last.position))
}

async fn conformance<W: EventStore, S: ProjectionStore>(
    backend: &str,
    writer: W,
    log: Arc<dyn EventLog>,
    store: S,
) {
    let seen = Arc::new(Seen::default());
    let mut good: Vec<uuid::Uuid> = Vec::new();
    let mut versions = [0u64; 6];

    // Catch-up: 120 events in 6 streams before the runner starts.
    let mut head = Checkpoint::START;
    for (i, version) in versions.iter_mut().enumerate() {
        let amounts: Vec<u64> = (1..=20).collect();
        let (ids, last) = append(&writer, &format!("s{i}"), version, &amounts).await;
        good.extend(ids);
        head = head.max(last);
    }
    let first = runner(&log, &store, &seen);
    first.setup().await.expect("setup");
    let (first_stop, first_task) = common::start_runner(&first);
    first
        .wait_for(head, &[NAME], Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{backend}: catch-up: {e}"));

    // Live tail: one append at a time, each waited for.
    for n in 0..20u64 {
        let (ids, last) = append(&writer, "s0", &mut versions[0], &[n + 1]).await;
        good.extend(ids);
        first
            .wait_for(last, &[NAME], Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{backend}: live tail, append {n}: {e}"));
    }

    // Parking: a refused event between good ones.
    let (poison, _) = append(&writer, "s1", &mut versions[1], &[POISON + 1]).await;
    let (ids, last) = append(&writer, "s1", &mut versions[1], &[1, 2, 3]).await;
    good.extend(ids);
    match first.wait_for(last, &[NAME], Duration::from_secs(30)).await {
        Err(WaitError::Parked { .. }) => {}
        other => panic!("{backend}: a wait past a parked event: {other:?}"),
    }
    let parked = first.dead_letters(NAME).await.expect("dead letters");
    assert_eq!(parked.len(), 1, "{backend}: {parked:?}");
    assert_eq!(parked[0].event_id, poison[0], "{backend}");
    assert!(
        parked[0].error.contains("is refused"),
        "{backend}: the handler's error is kept: {}",
        parked[0].error
    );

    // Failover: a second node; the first dies with its leases held.
    let second = runner(&log, &store, &seen);
    let (second_stop, second_task) = common::start_runner(&second);
    first_task.abort();
    let _ = first_task.await;
    drop(first_stop);
    let mut last = Checkpoint::START;
    for i in 0..10u64 {
        let (ids, at) = append(&writer, "s2", &mut versions[2], &[i + 1]).await;
        good.extend(ids);
        last = at;
    }
    second
        .wait_for(last, &[NAME], Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{backend}: the second node did not take over: {e}"));

    // Everything so far: each good event handled, none committed twice.
    {
        let handled = seen.handled.lock().expect("the record");
        for id in &good {
            assert!(handled.contains(&(0, *id)), "{backend}: {id} was skipped");
        }
    }

    // Rebuild: the whole log again, under a new generation.
    let mut progress = second.rebuild(NAME).await.expect("start the rebuild");
    tokio::time::timeout(Duration::from_secs(60), async {
        while !progress.borrow().is_complete() {
            progress.changed().await.expect("progress");
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{backend}: the rebuild did not finish: {:?}",
            *progress.borrow()
        )
    });
    match second
        .wait_for(last, &[NAME], Duration::from_secs(60))
        .await
    {
        Ok(()) | Err(WaitError::Parked { .. }) => {}
        Err(e) => panic!("{backend}: after the rebuild: {e}"),
    }
    let generation = seen.generation.load(Ordering::SeqCst);
    assert_eq!(generation, 1, "{backend}: one rebuild");
    {
        let handled = seen.handled.lock().expect("the record");
        for id in &good {
            assert!(
                handled.contains(&(generation, *id)),
                "{backend}: {id} was not replayed by the rebuild"
            );
        }
    }
    common::stop_runner(second_stop, second_task).await;

    let doubled = seen.doubled.lock().expect("the record");
    assert!(
        doubled.is_empty(),
        "{backend}: {} events in batches committed twice, the first: {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_memory() {
    let store = outflow::MemoryStore::new();
    conformance("memory", store.clone(), Arc::new(store.clone()), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let db = common::TestDb::new("runner_conformance").await;
    let store = db.store().await;
    conformance("PostgreSQL", store.clone(), Arc::new(store.clone()), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    let dir = common::TestDir::new("runner_conformance");
    let store = dir.sqlite().await;
    conformance("SQLite", store.clone(), Arc::new(store.clone()), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_into_sqlite() {
    let js = common::jetstream_store(&common::nats_url(), "conformance_sqlite", 1).await;
    let dir = common::TestDir::new("runner_conformance_js");
    let store = dir.sqlite().await;
    conformance("JetStream → SQLite", js.clone(), Arc::new(js), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_into_postgres() {
    let js = common::jetstream_store(&common::nats_url(), "conformance_pg", 1).await;
    let db = common::TestDb::new("runner_conformance_js").await;
    let store = db.store().await;
    conformance("JetStream → PostgreSQL", js.clone(), Arc::new(js), store).await;
}
