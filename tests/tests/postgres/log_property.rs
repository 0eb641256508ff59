//! A property test of the global log reader on PostgreSQL: random
//! interleavings of transactions on real connections — each writes another
//! row first or not, appends to one or two streams of its own, then commits
//! or rolls back, in a random order — with a reader following the log from
//! its checkpoint between the steps. The reader's output must be exactly
//! the committed events, each once, every stream in sequence order, however
//! late a transaction that took an early position commits.
//!
//! Failures shrink to a minimal schedule, which proptest keeps in
//! `tests/log_property.proptest-regressions` and replays first on every run.

use outflow_tests as common;

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use outflow::{
    AppendInTransaction, AppendRequest, Checkpoint, EventLog, LogFilter, NewEvent, PostgresStore,
    RecordedEvent, Transactional,
};
use proptest::prelude::*;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// Connections writing at once.
const WRITERS: usize = 4;

/// One transaction of a writer.
#[derive(Debug, Clone)]
struct Plan {
    /// Writes a row of another table before appending.
    other_write_first: bool,
    /// Events appended to each of the transaction's streams (one or two).
    appends: Vec<usize>,
    commit: bool,
}

/// A step of the schedule: which writer moves, or the reader reads.
#[derive(Debug, Clone, Copy)]
enum Step {
    Writer(usize),
    Read,
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        any::<bool>(),
        prop::collection::vec(1usize..4, 1..3),
        prop::bool::weighted(0.75),
    )
        .prop_map(|(other_write_first, appends, commit)| Plan {
            other_write_first,
            appends,
            commit,
        })
}

fn schedule() -> impl Strategy<Value = (Vec<Vec<Plan>>, Vec<Step>)> {
    prop::collection::vec(prop::collection::vec(plan(), 1..4), WRITERS).prop_flat_map(|plans| {
        // Each writer's transaction is three steps: begin (+ other write),
        // append, end. Interleave all of them with reads.
        let mut steps = Vec::new();
        for (writer, transactions) in plans.iter().enumerate() {
            for _ in 0..transactions.len() * 3 {
                steps.push(Step::Writer(writer));
            }
        }
        let reads = steps.len() / 2;
        steps.extend(std::iter::repeat_n(Step::Read, reads));
        (Just(plans), Just(steps).prop_shuffle())
    })
}

/// One shared server connection setup per process; a new events table per
/// case keeps cases apart.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

async fn database() -> &'static common::TestDb {
    static DB: tokio::sync::OnceCell<common::TestDb> = tokio::sync::OnceCell::const_new();
    DB.get_or_init(|| common::TestDb::new("log_property")).await
}

fn deposit(n: usize) -> NewEvent {
    common::deposit_event(n as u64)
}

/// A writer's progress through its transactions.
struct Writer {
    plans: Vec<Plan>,
    /// Index of the current transaction and of its next step (0..3).
    current: usize,
    step: usize,
    tx: Option<Transaction<'static, Postgres>>,
    /// Event ids appended in the open transaction.
    pending: Vec<Uuid>,
}

async fn run_case(plans: Vec<Vec<Plan>>, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let db = database().await;
    let table = format!("ev_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let store = PostgresStore::builder(db.pool(WRITERS as u32 + 4).await)
        .events_table(table.clone())
        .build()
        .await
        .expect("a store");
    sqlx::query("CREATE TABLE IF NOT EXISTS other_rows (id uuid PRIMARY KEY)")
        .execute(store.pool())
        .await
        .expect("the other table");

    let mut writers: Vec<Writer> = plans
        .into_iter()
        .map(|plans| Writer {
            plans,
            current: 0,
            step: 0,
            tx: None,
            pending: Vec::new(),
        })
        .collect();
    let mut committed: HashSet<Uuid> = HashSet::new();
    let mut read: Vec<RecordedEvent> = Vec::new();
    let mut cursor = Checkpoint::START;
    let filter = LogFilter::all();

    for step in steps {
        match step {
            Step::Read => {
                let batch = store.read_log(cursor, &filter, 1000).await.expect("read");
                if let Some(last) = batch.last() {
                    cursor = last.checkpoint();
                }
                read.extend(batch);
            }
            Step::Writer(index) => {
                let writer = &mut writers[index];
                let Some(plan) = writer.plans.get(writer.current).cloned() else {
                    continue;
                };
                match writer.step {
                    0 => {
                        let mut tx = store.begin().await.expect("begin");
                        if plan.other_write_first {
                            sqlx::query("INSERT INTO other_rows (id) VALUES ($1)")
                                .bind(Uuid::new_v4())
                                .execute(&mut *tx)
                                .await
                                .expect("the other write");
                        }
                        writer.tx = Some(tx);
                    }
                    1 => {
                        let tx = writer.tx.as_mut().expect("an open transaction");
                        for (stream, count) in plan.appends.iter().enumerate() {
                            let events: Vec<NewEvent> = (0..*count).map(deposit).collect();
                            writer.pending.extend(events.iter().map(|e| e.event_id));
                            store
                                .append_in(
                                    tx,
                                    AppendRequest {
                                        aggregate_type: "account".into(),
                                        // A stream of its own: writers never wait on each other.
                                        aggregate_id: format!(
                                            "w{index}-t{}-s{stream}",
                                            writer.current
                                        ),
                                        expected_version: 0,
                                        events,
                                    },
                                )
                                .await
                                .expect("append");
                        }
                    }
                    _ => {
                        let tx = writer.tx.take().expect("an open transaction");
                        if plan.commit {
                            store.commit(tx).await.expect("commit");
                            committed.extend(writer.pending.drain(..));
                        } else {
                            tx.rollback().await.expect("rollback");
                            writer.pending.clear();
                        }
                    }
                }
                writer.step += 1;
                if writer.step == 3 {
                    writer.step = 0;
                    writer.current += 1;
                }
            }
        }
    }
    // Everything has ended: the reader catches up. Another test's open
    // transaction on this shared server holds every reader back for a
    // while (whatever the database): wait until as many events as were
    // committed came, then read on until nothing more does — a reader that
    // lost one still fails below after 60 s, one that repeats or invents
    // one fails on the comparison.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let batch = store.read_log(cursor, &filter, 1000).await.expect("read");
        if let Some(last) = batch.last() {
            cursor = last.checkpoint();
            read.extend(batch);
            continue;
        }
        if read.len() >= committed.len() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let ids: Vec<Uuid> = read.iter().map(|e| e.event_id).collect();
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    prop_assert_eq!(unique.len(), ids.len(), "an event was read twice");
    prop_assert_eq!(&unique, &committed, "read differs from committed");
    let mut last_sequence: BTreeMap<&str, u64> = BTreeMap::new();
    for event in &read {
        let previous = last_sequence.insert(&event.aggregate_id, event.sequence);
        prop_assert_eq!(
            previous.map_or(1, |p| p + 1),
            event.sequence,
            "stream {} out of order",
            event.aggregate_id
        );
    }
    sqlx::query(&format!("DROP TABLE {table} CASCADE"))
        .execute(store.pool())
        .await
        .expect("drop the case's table");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("OUTFLOW_PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(48),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/log_property.proptest-regressions",
            ),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_reader_sees_exactly_the_committed_events_once_in_order((plans, steps) in schedule()) {
        runtime().block_on(run_case(plans, steps))?;
    }
}
