//! Leases and their fence on real PostgreSQL: a batch that takes longer than
//! the lease keeps it (renewals never wait for a batch, whether the slow part
//! runs before the transaction or inside it), and runners share the units of
//! a projection fairly, a late joiner included.
//!
//! Each node is a runner on a store of its own (its own pool), as separate
//! processes would be.

use outflow_tests as common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::store::{Checkpoints, ProjectionState};
use outflow::{AppendRequest, EventStore, LogFilter, NewEvent, PostgresStore, RecordedEvent};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use tokio::time::Instant;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(1);
const HEARTBEAT: Duration = Duration::from_millis(200);
const SLOW: Duration = Duration::from_secs(3);
const EVENTS: usize = 3;

/// Where the first batch is slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlowIn {
    /// In `effects`, before the batch's transaction.
    Effects,
    /// In `handle`, with the batch's transaction open.
    Handle,
}

/// Records each `account` event in `applied`; its first batch sleeps.
struct Slow {
    slow_in: SlowIn,
    first: AtomicBool,
    slow_batches: AtomicUsize,
    /// Events passed to `handle`, committed or not.
    handled: AtomicUsize,
}

impl Slow {
    fn new(slow_in: SlowIn) -> Arc<Slow> {
        Arc::new(Slow {
            slow_in,
            first: AtomicBool::new(true),
            slow_batches: AtomicUsize::new(0),
            handled: AtomicUsize::new(0),
        })
    }

    async fn maybe_sleep(&self, here: SlowIn) {
        if self.slow_in == here && self.first.swap(false, Ordering::AcqRel) {
            self.slow_batches.fetch_add(1, Ordering::AcqRel);
            tokio::time::sleep(SLOW).await;
        }
    }
}

#[async_trait]
impl Projection<PostgresStore> for Slow {
    fn name(&self) -> &str {
        "slow"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn effects(&self, _events: &[RecordedEvent]) -> Result<(), HandlerError> {
        self.maybe_sleep(SlowIn::Effects).await;
        Ok(())
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        self.handled.fetch_add(events.len(), Ordering::AcqRel);
        self.maybe_sleep(SlowIn::Handle).await;
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        sqlx::query("INSERT INTO applied (event_id) SELECT UNNEST($1::uuid[])")
            .bind(&ids)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// Does nothing; only its units matter.
struct Noop;

#[async_trait]
impl Projection<PostgresStore> for Noop {
    fn name(&self) -> &str {
        "spread"
    }

    async fn handle(
        &self,
        _events: &[RecordedEvent],
        _tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn runner(
    store: &PostgresStore,
    node: &str,
    options: ProjectionOptions<PostgresStore>,
) -> ProjectionRunner<PostgresStore> {
    ProjectionRunner::builder(store.clone())
        .node_id(node)
        .lease_ttl(LEASE)
        .heartbeat_interval(HEARTBEAT)
        .projection(options)
        .build()
        .expect("build the runner")
}

/// Checks the single unit of `slow`: owned by node-a under epoch 1 with a
/// valid lease.
async fn assert_held_by_a(store: &PostgresStore, when: &str) {
    let units = store.units(Some("slow")).await.expect("read the units");
    assert_eq!(units.len(), 1, "one unit: {units:?}");
    let unit = &units[0];
    assert_eq!(
        (unit.owner.as_deref(), unit.epoch, unit.lease_valid),
        (Some("node-a"), 1, true),
        "{when}: the unit changed owner, epoch or lost its lease: {unit:?}"
    );
}

async fn a_slow_batch_keeps_its_lease(slow_in: SlowIn, label: &str) {
    let db = common::TestDb::new(label).await;
    let writer = db.store().await;
    let store_a = db.store().await;
    let store_b = db.store().await;
    sqlx::query("CREATE TABLE applied (event_id uuid PRIMARY KEY)")
        .execute(writer.pool())
        .await
        .expect("create the table `applied`");
    let events = (0..EVENTS)
        .map(|i| NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "Deposited".into(),
            event_version: "1.0".into(),
            payload: json!({ "Deposited": { "amount": i } }),
            metadata: Default::default(),
            correlation_id: None,
            causation_id: None,
        })
        .collect();
    let written = writer
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "slow-1".into(),
            expected_version: 0,
            events,
        })
        .await
        .expect("append the events");
    let last = written.last().expect("events written").checkpoint();

    let slow_a = Slow::new(slow_in);
    let slow_b = Slow::new(slow_in);
    let runner_a = runner(
        &store_a,
        "node-a",
        ProjectionOptions::from_arc(slow_a.clone()),
    );
    let runner_b = runner(
        &store_b,
        "node-b",
        ProjectionOptions::from_arc(slow_b.clone()),
    );
    let started = Instant::now();
    let (shutdown_a, handle_a) = common::start_runner(&runner_a);
    common::eventually(
        "node-a claims the unit",
        Duration::from_secs(10),
        || async {
            match writer.units(Some("slow")).await.expect("units").as_slice() {
                [u] if u.owner.as_deref() == Some("node-a") && u.lease_valid => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let (shutdown_b, handle_b) = common::start_runner(&runner_b);

    // Until the events are applied (the first batch takes 3 s, three
    // leases), the unit stays node-a's under its first epoch, error-free.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_held_by_a(&writer, "during the slow batch").await;
        let status = common::status_of(&runner_b, "slow").await;
        assert_eq!(
            status.last_error, None,
            "status showed an error: {status:?}"
        );
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM applied")
            .fetch_one(writer.pool())
            .await
            .expect("count `applied`");
        if applied == EVENTS as i64
            && status.state == ProjectionState::Live
            && status.checkpoint >= last
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the events were not applied within 30 s: {applied} rows, {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= SLOW,
        "the slow batch was observed for {:?} only",
        started.elapsed()
    );
    assert_eq!(
        slow_a.slow_batches.load(Ordering::Acquire),
        1,
        "node-a ran the slow batch"
    );
    assert_eq!(
        slow_b.handled.load(Ordering::Acquire),
        0,
        "node-b never handled a batch"
    );

    // Two more leases: nothing moves once the batch is done either.
    let observe_until = Instant::now() + 2 * LEASE;
    while Instant::now() < observe_until {
        assert_held_by_a(&writer, "after the slow batch").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let units = writer.units(Some("slow")).await.expect("units");
    assert_eq!(units[0].processed, EVENTS as u64, "each event applied once");
    assert!(runner_a
        .dead_letters("slow")
        .await
        .expect("dead letters")
        .is_empty());
    common::stop_runner(shutdown_b, handle_b).await;
    common::stop_runner(shutdown_a, handle_a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_batch_keeps_its_lease_with_no_transaction_open() {
    a_slow_batch_keeps_its_lease(SlowIn::Effects, "fence_effects").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_handle_inside_the_transaction_keeps_its_lease_too() {
    a_slow_batch_keeps_its_lease(SlowIn::Handle, "fence_handle").await;
}

/// Units owned per node, per `status()`.
async fn spread(runner: &ProjectionRunner<PostgresStore>) -> BTreeMap<String, usize> {
    let mut spread = BTreeMap::new();
    for status in runner.status().await.expect("status") {
        if let Some(owner) = status.owner.filter(|_| status.projection == "spread") {
            *spread.entry(owner).or_insert(0) += 1;
        }
    }
    spread
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_runners_on_four_partitions_all_get_work() {
    let db = common::TestDb::new("fence_spread").await;
    let mut running = Vec::new();
    let mut runners = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        let runner = runner(
            &db.store().await,
            node,
            ProjectionOptions::new(Noop).partitions(4),
        );
        running.push(common::start_runner(&runner));
        runners.push(runner);
    }
    let watcher = runners[0].clone();

    // Every runner gets work: counts 2, 1, 1 (which node holds two is not
    // fixed), every unit owned.
    let nodes = ["node-a", "node-b", "node-c"];
    common::eventually("a 2/1/1 spread", Duration::from_secs(15), || async {
        let now = spread(&watcher).await;
        let mut counts: Vec<usize> = now.values().copied().collect();
        counts.sort_unstable();
        if counts == [1, 1, 2] && nodes.iter().all(|n| now.contains_key(*n)) {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;

    // A late joiner gets work: one unit each.
    let late = runner(
        &db.store().await,
        "node-d",
        ProjectionOptions::new(Noop).partitions(4),
    );
    running.push(common::start_runner(&late));
    let four: BTreeMap<String, usize> = ["node-a", "node-b", "node-c", "node-d"]
        .map(|n| (n.to_owned(), 1))
        .into();
    common::eventually(
        "one unit each after node-d joined",
        Duration::from_secs(15),
        || async {
            let now = spread(&watcher).await;
            if now == four {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    )
    .await;
    let observe_until = Instant::now() + 2 * LEASE;
    while Instant::now() < observe_until {
        assert_eq!(spread(&watcher).await, four, "the spread did not hold");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (shutdown, handle) in running {
        common::stop_runner(shutdown, handle).await;
    }
}
