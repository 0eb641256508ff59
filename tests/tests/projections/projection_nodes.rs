//! Several runners (nodes) share the units of a projection on real
//! PostgreSQL: one owner per unit at a time, failover after a crash within
//! the lease, an even spread over the live nodes, and a handover to a node
//! that joins later — with every event handled exactly once, each
//! aggregate's events in sequence order, whoever handles them.
//!
//! Each node is a runner on a store of its own (its own pool), as separate
//! processes would be. A test projection records which node handled each
//! event, in a table whose primary key is the event id: a second handling
//! would fail the batch (and end up parked), so an empty dead-letter list and
//! a row count equal to the event count prove exactly once.

use outflow_tests as common;

use outflow::EventLog;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use example_accounts::{BankAccount, BankEvent};
use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::{
    AppendRequest, Checkpoint, EventStore, LogFilter, NewEvent, PostgresStore, RecordedEvent,
};
use sqlx::{Postgres, Transaction};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PROJECTION: &str = "handled_by";
const LEASE: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_millis(200);
const BATCH: usize = 20;

/// Records, for every `account` event, the node that handled it, the
/// handling transaction and the order of handling.
struct Recorder {
    node: String,
}

async fn create_table(store: &PostgresStore) {
    sqlx::query(
        "CREATE TABLE handled (
            event_id      uuid PRIMARY KEY,
            node          text   NOT NULL,
            aggregate_id  text   NOT NULL,
            sequence      bigint NOT NULL,
            tx            bigint NOT NULL DEFAULT txid_current(),
            handled_order bigserial)",
    )
    .execute(store.pool())
    .await
    .expect("create the table `handled`");
}

#[async_trait]
impl Projection<PostgresStore> for Recorder {
    fn name(&self) -> &str {
        PROJECTION
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let aggregates: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
        let sequences: Vec<i64> = events
            .iter()
            .map(|e| i64::try_from(e.sequence))
            .collect::<Result<_, _>>()?;
        sqlx::query(
            "INSERT INTO handled (event_id, node, aggregate_id, sequence)
             SELECT id, $2, agg, seq
               FROM UNNEST($1::uuid[], $3::text[], $4::bigint[]) WITH ORDINALITY AS u(id, agg, seq, ord)
              ORDER BY ord",
        )
        .bind(&ids)
        .bind(&self.node)
        .bind(&aggregates)
        .bind(&sequences)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

fn runner(store: &PostgresStore, node: &str, partitions: u32) -> ProjectionRunner<PostgresStore> {
    ProjectionRunner::builder(store.clone())
        .node_id(node)
        .lease_ttl(LEASE)
        .heartbeat_interval(HEARTBEAT)
        .projection(
            ProjectionOptions::new(Recorder {
                node: node.to_owned(),
            })
            .partitions(partitions)
            .batch_size(BATCH),
        )
        .build()
        .expect("build the runner")
}

/// Appends to `account` streams (1 to 3 events per append, the first opening
/// the account) and, now and then, to an `other` stream the projection does
/// not want, until stopped.
struct Appender {
    stop: CancellationToken,
    handle: JoinHandle<(usize, Checkpoint)>,
}

impl Appender {
    fn start(store: PostgresStore, prefix: &'static str, accounts: usize) -> Appender {
        let stop = CancellationToken::new();
        let handle = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut versions = vec![0u64; accounts];
                let mut noise_version = 0u64;
                let mut appended = 0usize;
                let mut last = Checkpoint::START;
                let mut round = 0usize;
                while !stop.is_cancelled() {
                    let account = round % accounts;
                    let id = format!("{prefix}-{account:02}");
                    let count = 1 + round % 3;
                    let events = (0..count)
                        .map(|i| {
                            let event = if versions[account] == 0 && i == 0 {
                                BankEvent::AccountOpened {
                                    owner: format!("owner {account}"),
                                }
                            } else {
                                BankEvent::Deposited {
                                    amount: (round % 17 + 1) as i64,
                                }
                            };
                            NewEvent::from_event::<BankAccount>(&id, &event).expect("serialize")
                        })
                        .collect();
                    let written = store
                        .append(AppendRequest {
                            aggregate_type: "account".into(),
                            aggregate_id: id,
                            expected_version: versions[account],
                            events,
                        })
                        .await
                        .expect("append account events");
                    if let Some(event) = written.last() {
                        last = last.max(event.checkpoint());
                    }
                    versions[account] += count as u64;
                    appended += count;
                    if round % 5 == 4 {
                        let event = NewEvent::from_event::<BankAccount>(
                            "noise",
                            &BankEvent::Deposited { amount: 1 },
                        )
                        .expect("serialize");
                        store
                            .append(AppendRequest {
                                aggregate_type: "other".into(),
                                aggregate_id: format!("{prefix}-noise"),
                                expected_version: noise_version,
                                events: vec![event],
                            })
                            .await
                            .expect("append a noise event");
                        noise_version += 1;
                    }
                    round += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (appended, last)
            }
        });
        Appender { stop, handle }
    }

    /// Stops appending; returns the number of `account` events appended and
    /// the checkpoint of the last one (the log's head can lag behind it while
    /// other tests hold transactions open).
    async fn finish(self) -> (usize, Checkpoint) {
        self.stop.cancel();
        self.handle.await.expect("the appender failed")
    }
}

/// Appends one `account` event to a stream of its own; returns its checkpoint.
async fn append_marker(store: &PostgresStore, id: &str) -> (Checkpoint, Uuid) {
    let event = NewEvent::from_event::<BankAccount>(
        id,
        &BankEvent::AccountOpened {
            owner: "marker".into(),
        },
    )
    .expect("serialize");
    let recorded = store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: id.into(),
            expected_version: 0,
            events: vec![event],
        })
        .await
        .expect("append the marker");
    (recorded[0].checkpoint(), recorded[0].event_id)
}

/// The owner of each partition, per `status()`.
async fn owners(runner: &ProjectionRunner<PostgresStore>) -> Vec<Option<String>> {
    runner
        .status()
        .await
        .expect("status")
        .into_iter()
        .filter(|s| s.projection == PROJECTION)
        .map(|s| s.owner)
        .collect()
}

/// Units owned per node.
fn spread(owners: &[Option<String>]) -> BTreeMap<String, usize> {
    let mut spread = BTreeMap::new();
    for owner in owners.iter().flatten() {
        *spread.entry(owner.clone()).or_insert(0) += 1;
    }
    spread
}

async fn nodes_in_table(store: &PostgresStore) -> Vec<String> {
    sqlx::query_scalar("SELECT DISTINCT node FROM handled ORDER BY node")
        .fetch_all(store.pool())
        .await
        .expect("read the nodes in `handled`")
}

/// Checks that the projection handled every `account` event exactly once
/// (`expected` of them), each aggregate's events in sequence order, and
/// each batch within one partition; returns the rows per node.
async fn assert_exactly_once(
    store: &PostgresStore,
    runner: &ProjectionRunner<PostgresStore>,
    expected: usize,
    partitions: u32,
) -> BTreeMap<String, i64> {
    let events = common::read_until(
        store,
        Checkpoint::START,
        &LogFilter::aggregate_types(["account"]),
        expected,
    )
    .await;
    assert_eq!(
        events.len(),
        expected,
        "the log holds another number of account events than were appended"
    );

    let dead_letters = runner.dead_letters(PROJECTION).await.expect("dead letters");
    assert!(
        dead_letters.is_empty(),
        "events were parked (a second handling hits the primary key): {dead_letters:#?}"
    );

    let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT event_id, node FROM handled")
        .fetch_all(store.pool())
        .await
        .expect("read `handled`");
    let handled: HashSet<Uuid> = rows.iter().map(|(id, _)| *id).collect();
    let in_log: HashSet<Uuid> = events.iter().map(|e| e.event_id).collect();
    let missing: Vec<_> = events
        .iter()
        .filter(|e| !handled.contains(&e.event_id))
        .map(|e| e.event_ref().to_string())
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "events never handled (first 10): {missing:?}"
    );
    let foreign: Vec<_> = handled.difference(&in_log).take(10).collect();
    assert!(
        foreign.is_empty(),
        "handled events that are not account events of the log: {foreign:?}"
    );
    assert_eq!(rows.len(), expected, "rows in `handled` vs. events");

    let processed: u64 = runner
        .status()
        .await
        .expect("status")
        .iter()
        .filter(|s| s.projection == PROJECTION)
        .map(|s| s.processed)
        .sum();
    assert_eq!(
        processed, expected as u64,
        "events counted as processed by committed batches, summed over the units"
    );

    // Per aggregate, handling order = sequence order, with no gap.
    let per_aggregate: Vec<(String, Vec<i64>)> = sqlx::query_as(
        "SELECT aggregate_id, array_agg(sequence ORDER BY handled_order)
           FROM handled GROUP BY aggregate_id ORDER BY aggregate_id",
    )
    .fetch_all(store.pool())
    .await
    .expect("read the handling order");
    let mut log_counts: HashMap<&str, i64> = HashMap::new();
    for event in &events {
        *log_counts.entry(&event.aggregate_id).or_insert(0) += 1;
    }
    assert_eq!(per_aggregate.len(), log_counts.len(), "aggregates handled");
    for (aggregate, sequences) in &per_aggregate {
        let in_order: Vec<i64> = (1..=log_counts[aggregate.as_str()]).collect();
        assert_eq!(
            sequences, &in_order,
            "events of {aggregate} were not handled in sequence order"
        );
    }

    if partitions > 1 {
        // Every batch (one transaction) holds the events of one partition.
        let mixed: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT tx, count(DISTINCT mod(abs(hashtext(aggregate_id)::bigint), $1))
               FROM handled GROUP BY tx
             HAVING count(DISTINCT mod(abs(hashtext(aggregate_id)::bigint), $1)) > 1",
        )
        .bind(i64::from(partitions))
        .fetch_all(store.pool())
        .await
        .expect("read the batches");
        assert!(
            mixed.is_empty(),
            "batches (transaction, partitions) spanning several partitions: {mixed:?}"
        );
        let used: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT mod(abs(hashtext(aggregate_id)::bigint), $1)) FROM handled",
        )
        .bind(i64::from(partitions))
        .fetch_one(store.pool())
        .await
        .expect("count the partitions");
        assert_eq!(
            used,
            i64::from(partitions),
            "the aggregates should fall into every partition"
        );
    }

    let per_node: Vec<(String, i64)> =
        sqlx::query_as("SELECT node, count(*) FROM handled GROUP BY node")
            .fetch_all(store.pool())
            .await
            .expect("count rows per node");
    per_node.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_owner_at_a_time_and_failover_after_a_crash() {
    let db = common::TestDb::new("nodes_failover").await;
    let writer = db.store().await;
    let store_a = db.store().await;
    let store_b = db.store().await;
    create_table(&writer).await;
    let appender = Appender::start(writer.clone(), "fo", 12);

    let runner_a = runner(&store_a, "node-a", 1);
    let runner_b = runner(&store_b, "node-b", 1);
    let (shutdown_a, handle_a) = common::start_runner(&runner_a);
    let (shutdown_b, handle_b) = common::start_runner(&runner_b);

    let (owner, _) = common::eventually(
        "a node claims the unit",
        Duration::from_secs(10),
        || async {
            match owners(&runner_a).await.as_slice() {
                [Some(owner)] => Ok(owner.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // While both run, the owner never changes and only it handles events.
    let observe_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < observe_until {
        for runner in [&runner_a, &runner_b] {
            assert_eq!(
                owners(runner).await,
                vec![Some(owner.clone())],
                "the unit changed hands while both nodes were alive"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        nodes_in_table(&writer).await,
        vec![owner.clone()],
        "only the owner may have handled events"
    );

    // Crash the owner: its run future is dropped, nothing is given back.
    let (victim, victim_shutdown, survivor, survivor_runner, survivor_shutdown, survivor_handle) =
        if owner == "node-a" {
            (
                handle_a, shutdown_a, "node-b", runner_b, shutdown_b, handle_b,
            )
        } else {
            (
                handle_b, shutdown_b, "node-a", runner_a, shutdown_a, handle_a,
            )
        };
    victim.abort();
    let killed = Instant::now();
    let aborted = victim.await.expect_err("the aborted task does not finish");
    assert!(aborted.is_cancelled(), "the owner's task was aborted");
    drop(victim_shutdown);
    let (marker, marker_id) = append_marker(&writer, "fo-after-crash").await;

    let (_, took) = common::eventually(
        "the survivor takes the unit over",
        Duration::from_secs(10).saturating_sub(killed.elapsed()),
        || async {
            match owners(&survivor_runner).await.as_slice() {
                [Some(now)] if now == survivor => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    survivor_runner
        .wait_for(
            marker,
            &[PROJECTION],
            Duration::from_secs(10).saturating_sub(killed.elapsed()),
        )
        .await
        .expect("an event appended after the crash is handled within 10 s");
    let takeover = killed.elapsed();
    let marker_node: String = sqlx::query_scalar("SELECT node FROM handled WHERE event_id = $1")
        .bind(marker_id)
        .fetch_one(writer.pool())
        .await
        .expect("the marker's row");
    assert_eq!(marker_node, survivor, "the survivor handled the new event");
    println!("owner after {took:?}, new event handled {takeover:?} after the crash");

    // Events keep flowing through the survivor.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (appended, last) = appender.finish().await;
    let appended = appended + 1;
    let head = writer.head().await.expect("head").max(last);
    survivor_runner
        .wait_for(head, &[PROJECTION], Duration::from_secs(60))
        .await
        .expect("the survivor catches up");

    // The crashed node's rows all come before the survivor's.
    let (last_victim, first_survivor): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT max(handled_order) FILTER (WHERE node = $1),
                min(handled_order) FILTER (WHERE node = $2)
           FROM handled",
    )
    .bind(&owner)
    .bind(survivor)
    .fetch_one(writer.pool())
    .await
    .expect("read the handling order");
    let (Some(last_victim), Some(first_survivor)) = (last_victim, first_survivor) else {
        panic!("both nodes should have handled events: {last_victim:?} {first_survivor:?}");
    };
    assert!(
        last_victim < first_survivor,
        "the nodes' handling interleaved: the crashed node's last row {last_victim}, \
         the survivor's first {first_survivor}"
    );

    let per_node = assert_exactly_once(&writer, &survivor_runner, appended, 1).await;
    println!("rows per node: {per_node:?}");
    common::stop_runner(survivor_shutdown, survivor_handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_partitions_spread_over_two_nodes() {
    let db = common::TestDb::new("nodes_spread").await;
    let writer = db.store().await;
    let store_a = db.store().await;
    let store_b = db.store().await;
    create_table(&writer).await;
    let appender = Appender::start(writer.clone(), "sp", 24);

    let runner_a = runner(&store_a, "node-a", 4);
    let runner_b = runner(&store_b, "node-b", 4);
    let (shutdown_a, handle_a) = common::start_runner(&runner_a);
    let (shutdown_b, handle_b) = common::start_runner(&runner_b);

    let expected: BTreeMap<String, usize> = [("node-a".to_owned(), 2), ("node-b".to_owned(), 2)]
        .into_iter()
        .collect();
    let (_, took) = common::eventually("two units per node", Duration::from_secs(15), || async {
        let owners = owners(&runner_a).await;
        if spread(&owners) == expected {
            Ok(())
        } else {
            Err(format!("{owners:?}"))
        }
    })
    .await;
    println!("spread 2/2 after {took:?}");

    // The spread holds: no unit keeps moving between the nodes.
    let observe_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < observe_until {
        let owners = owners(&runner_b).await;
        assert_eq!(
            spread(&owners),
            expected,
            "the spread did not hold: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (appended, last) = appender.finish().await;
    let head = writer.head().await.expect("head").max(last);
    runner_a
        .wait_for(head, &[PROJECTION], Duration::from_secs(60))
        .await
        .expect("both nodes catch up");
    let per_node = assert_exactly_once(&writer, &runner_a, appended, 4).await;
    assert!(
        per_node.get("node-a").is_some_and(|&n| n > 0)
            && per_node.get("node-b").is_some_and(|&n| n > 0),
        "both nodes should have handled events: {per_node:?}"
    );
    println!("rows per node: {per_node:?}");
    common::stop_runner(shutdown_a, handle_a).await;
    common::stop_runner(shutdown_b, handle_b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joining_later_takes_over_half_the_work() {
    let db = common::TestDb::new("nodes_join").await;
    let writer = db.store().await;
    let store_a = db.store().await;
    let store_b = db.store().await;
    create_table(&writer).await;
    let appender = Appender::start(writer.clone(), "jn", 24);

    let runner_a = runner(&store_a, "node-a", 4);
    let (shutdown_a, handle_a) = common::start_runner(&runner_a);
    let all_a = vec![Some("node-a".to_owned()); 4];
    common::eventually(
        "node-a alone owns all four units",
        Duration::from_secs(10),
        || async {
            let owners = owners(&runner_a).await;
            if owners == all_a {
                Ok(())
            } else {
                Err(format!("{owners:?}"))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        nodes_in_table(&writer).await,
        vec!["node-a".to_owned()],
        "only node-a has run so far"
    );

    let runner_b = runner(&store_b, "node-b", 4);
    let (shutdown_b, handle_b) = common::start_runner(&runner_b);
    let expected: BTreeMap<String, usize> = [("node-a".to_owned(), 2), ("node-b".to_owned(), 2)]
        .into_iter()
        .collect();
    let (_, took) = common::eventually(
        "the units spread 2/2 after node-b joined",
        Duration::from_secs(10),
        || async {
            let owners = owners(&runner_b).await;
            if spread(&owners) == expected {
                Ok(())
            } else {
                Err(format!("{owners:?}"))
            }
        },
    )
    .await;
    println!("spread 2/2 {took:?} after node-b joined");

    // node-b handles an event appended after it joined, in one of its units.
    let of_b: Vec<i64> = runner_b
        .status()
        .await
        .expect("status")
        .iter()
        .filter(|s| s.owner.as_deref() == Some("node-b"))
        .map(|s| i64::from(s.partition))
        .collect();
    let mut marker_aggregate = None;
    for candidate in 0..100 {
        let id = format!("jn-after-join-{candidate}");
        let partition: i64 = sqlx::query_scalar("SELECT mod(abs(hashtext($1)::bigint), 4)")
            .bind(&id)
            .fetch_one(writer.pool())
            .await
            .expect("hash an aggregate id");
        if of_b.contains(&partition) {
            marker_aggregate = Some(id);
            break;
        }
    }
    let marker_aggregate = marker_aggregate.expect("an aggregate id in one of node-b's partitions");
    let (marker, marker_id) = append_marker(&writer, &marker_aggregate).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (appended, last) = appender.finish().await;
    let appended = appended + 1;
    let head = writer.head().await.expect("head").max(last);
    runner_b
        .wait_for(head.max(marker), &[PROJECTION], Duration::from_secs(60))
        .await
        .expect("both nodes catch up");
    let per_node = assert_exactly_once(&writer, &runner_b, appended, 4).await;
    assert!(
        per_node.get("node-b").is_some_and(|&n| n > 0),
        "node-b should have handled events: {per_node:?}"
    );
    let marker_node: String = sqlx::query_scalar("SELECT node FROM handled WHERE event_id = $1")
        .bind(marker_id)
        .fetch_one(writer.pool())
        .await
        .expect("the marker's row");
    assert_eq!(
        marker_node, "node-b",
        "an event of node-b's partitions appended after the handover"
    );
    println!("rows per node: {per_node:?}");
    common::stop_runner(shutdown_a, handle_a).await;
    common::stop_runner(shutdown_b, handle_b).await;
}
