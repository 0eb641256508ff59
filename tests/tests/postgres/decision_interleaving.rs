//! Conditional appends on PostgreSQL against writers whose transactions are
//! held open on purpose: a competing writer of a matching event that is
//! still uncommitted is waited for and then seen, one that commits late
//! with an older transaction id than events the decider read is still
//! seen, a plain writer is waited for by a condition on event types, and a
//! long transaction elsewhere never stalls decisions. Then a property test:
//! conditional appends interleaved with plain appends, rollbacks and
//! transactions left open, against a model of what each condition saw.

use outflow_tests as common;

use std::time::Duration;

use outflow::store::{AppendCondition, ConditionalAppend, ReadPosition};
use outflow::tags::{Query, QueryItem};
use outflow::{
    AppendInTransaction, AppendRequest, NewEvent, PostgresStore, StoreError, Transactional,
};
use proptest::prelude::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn request(stream: &str, event_type: &str) -> AppendRequest {
    AppendRequest::new(
        "thing",
        stream,
        0,
        vec![NewEvent::new(event_type, json!({ event_type: {} }))],
    )
}

fn tagged(tag: &str) -> Vec<Vec<String>> {
    vec![vec![tag.to_owned()]]
}

/// Waits until a session of this database waits for a lock of `kind`
/// (`advisory`, `relation`).
async fn someone_waits_for(store: &PostgresStore, kind: &str) {
    common::eventually(
        &format!("a session waiting on a {kind} lock"),
        WAIT,
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
              WHERE datname = current_database() AND wait_event_type = 'Lock' \
                AND wait_event = $1",
            )
            .bind(kind)
            .fetch_one(store.pool())
            .await
            .expect("read pg_stat_activity");
            if waiting > 0 {
                Ok(())
            } else {
                Err("nobody waits yet".to_owned())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncommitted_matching_writer_is_waited_for_then_seen() {
    let db = common::TestDb::new("decision_uncommitted").await;
    let store = db.store().await;
    let query = Query::new().with(QueryItem::tags(["course:1"]));
    let mut held = store.begin().await.expect("begin");
    store
        .append_tagged_in(
            &mut held,
            request("held", "Subscribed"),
            tagged("course:1"),
            None,
        )
        .await
        .expect("append in the held transaction");
    let read = store.read_query(&query, None).await.expect("read");
    assert!(read.events.is_empty(), "the held event is not committed");
    let decider = {
        let store = store.clone();
        let condition = AppendCondition::new(query.clone(), read.position);
        tokio::spawn(async move {
            store
                .append_if(
                    request("decided", "Subscribed"),
                    tagged("course:1"),
                    Some(condition),
                )
                .await
        })
    };
    someone_waits_for(&store, "advisory").await;
    assert!(
        !decider.is_finished(),
        "the decider went ahead of the held writer"
    );
    store.commit(held).await.expect("commit the held writer");
    let result = decider.await.expect("the decider panicked");
    let refused = result.expect_err("the held writer's event matches");
    assert!(
        matches!(refused, StoreError::ConditionFailed { .. }),
        "{refused}"
    );
    let now = store.read_query(&query, None).await.expect("read");
    assert_eq!(now.events.len(), 1);
    assert_eq!(now.events[0].aggregate_id, "held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_writer_releases_the_decider() {
    let db = common::TestDb::new("decision_rollback").await;
    let store = db.store().await;
    let query = Query::new().with(QueryItem::tags(["course:1"]));
    let mut held = store.begin().await.expect("begin");
    store
        .append_tagged_in(
            &mut held,
            request("held", "Subscribed"),
            tagged("course:1"),
            None,
        )
        .await
        .expect("append in the held transaction");
    let read = store.read_query(&query, None).await.expect("read");
    let decider = {
        let store = store.clone();
        let condition = AppendCondition::new(query.clone(), read.position);
        tokio::spawn(async move {
            store
                .append_if(
                    request("decided", "Subscribed"),
                    tagged("course:1"),
                    Some(condition),
                )
                .await
        })
    };
    someone_waits_for(&store, "advisory").await;
    drop(held);
    decider
        .await
        .expect("the decider panicked")
        .expect("nothing matching was committed");
    let now = store.read_query(&query, None).await.expect("read");
    assert_eq!(now.events.len(), 1);
    assert_eq!(now.events[0].aggregate_id, "decided");
}

/// The late-commit hazard: the writer's transaction id is older than that
/// of an event the decider read, and it commits before the decider
/// appends. Ordered by (transaction id, position) its event sorts before
/// what the decider read; the read's snapshot still names it unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_with_an_older_transaction_id_is_seen() {
    let db = common::TestDb::new("decision_late_commit").await;
    let store = db.store().await;
    let query = Query::new().with(QueryItem::tags(["course:1"]));
    // The late writer takes its transaction id first.
    let mut late = store.begin().await.expect("begin");
    let late_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *late)
        .await
        .expect("take a transaction id");
    // A newer transaction writes a matching event and commits.
    store
        .append_if(request("early", "Subscribed"), tagged("course:1"), None)
        .await
        .expect("the newer writer");
    let read = store.read_query(&query, None).await.expect("read");
    assert_eq!(read.events.len(), 1);
    assert!(
        read.events[0].transaction_id > late_xid.parse::<u64>().expect("an xid"),
        "the event read is newer than the late writer"
    );
    // The late writer appends and commits before the decider appends.
    store
        .append_tagged_in(
            &mut late,
            request("late", "Subscribed"),
            tagged("course:1"),
            None,
        )
        .await
        .expect("the late append");
    store.commit(late).await.expect("the late commit");
    let refused = store
        .append_if(
            request("decided", "Subscribed"),
            tagged("course:1"),
            Some(AppendCondition::new(query.clone(), read.position.clone())),
        )
        .await
        .expect_err("the late event matches");
    assert!(
        matches!(refused, StoreError::ConditionFailed { .. }),
        "{refused}"
    );
    // The late event sorts before the one the decider read: a condition on
    // the last event's checkpoint alone would have missed it.
    let now = store.read_query(&query, None).await.expect("read");
    let late_event = now
        .events
        .iter()
        .find(|e| e.aggregate_id == "late")
        .expect("the late event");
    assert!(late_event.checkpoint() < read.position.checkpoint());
}

/// A condition on event types alone waits for every writer of the table,
/// tagged or not, and then sees a matching plain event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_on_types_waits_for_plain_writers() {
    let db = common::TestDb::new("decision_types").await;
    let store = db.store().await;
    let query = Query::new().with(QueryItem::types(["CourseDefined"]));
    let mut held = store.begin().await.expect("begin");
    store
        .append_in(&mut held, request("plain", "CourseDefined"))
        .await
        .expect("a plain append, held");
    let read = store.read_query(&query, None).await.expect("read");
    assert!(read.events.is_empty());
    let decider = {
        let store = store.clone();
        let condition = AppendCondition::new(query.clone(), read.position);
        tokio::spawn(async move {
            store
                .append_if(
                    request("decided", "CourseDefined"),
                    Vec::new(),
                    Some(condition),
                )
                .await
        })
    };
    someone_waits_for(&store, "relation").await;
    assert!(!decider.is_finished());
    store.commit(held).await.expect("commit the plain writer");
    let refused = decider
        .await
        .expect("the decider panicked")
        .expect_err("the plain event matches");
    assert!(refused.is_conflict(), "{refused}");
}

/// A condition with an item of types alone and an item of tags, against a
/// held writer of a tagged event: the decider takes the tag's key before
/// the table, so the two never wait on each other in a circle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_on_types_and_tags_waits_without_a_deadlock() {
    let db = common::TestDb::new("decision_mixed").await;
    let store = db.store().await;
    let query = Query::new()
        .with(QueryItem::types(["CourseDefined"]))
        .with(QueryItem::tags(["course:1"]));
    let mut held = store.begin().await.expect("begin");
    store
        .append_tagged_in(
            &mut held,
            request("held", "Subscribed"),
            tagged("course:1"),
            None,
        )
        .await
        .expect("append in the held transaction");
    let read = store.read_query(&query, None).await.expect("read");
    let decider = {
        let store = store.clone();
        let condition = AppendCondition::new(query.clone(), read.position);
        tokio::spawn(async move {
            store
                .append_if(
                    request("decided", "CourseDefined"),
                    tagged("course:1"),
                    Some(condition),
                )
                .await
        })
    };
    someone_waits_for(&store, "advisory").await;
    store.commit(held).await.expect("commit the held writer");
    let refused = decider
        .await
        .expect("the decider panicked")
        .expect_err("the held event matches");
    assert!(
        matches!(refused, StoreError::ConditionFailed { .. }),
        "{refused}"
    );
}

/// A condition needs READ COMMITTED; in another isolation level it is
/// refused, saying why, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_in_a_repeatable_read_transaction_is_refused() {
    let db = common::TestDb::new("decision_isolation").await;
    let store = db.store().await;
    let query = Query::new().with(QueryItem::tags(["course:1"]));
    let read = store.read_query(&query, None).await.expect("read");
    let mut tx = store.begin().await.expect("begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .expect("set the isolation level");
    let refused = store
        .append_tagged_in(
            &mut tx,
            request("decided", "Subscribed"),
            tagged("course:1"),
            Some(&AppendCondition::new(query.clone(), read.position)),
        )
        .await
        .expect_err("not READ COMMITTED");
    assert!(
        matches!(refused, StoreError::Unsupported { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("READ COMMITTED"), "{refused}");
    drop(tx);
    assert!(store
        .read_query(&query, None)
        .await
        .expect("read")
        .events
        .is_empty());
}

/// A transaction left open elsewhere on the server holds the log's readers
/// back, but not decisions: they read and decide on what is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_elsewhere_does_not_stall_decisions() {
    let db = common::TestDb::new("decision_long_tx").await;
    let store = db.store().await;
    let mut long = store.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *long)
        .await
        .expect("take a transaction id");
    let query = Query::new().with(QueryItem::tags(["course:9"]));
    for i in 0..5 {
        let read = store.read_query(&query, None).await.expect("read");
        assert_eq!(read.events.len(), i, "each decision sees the ones before");
        store
            .append_if(
                request(&format!("s-{i}"), "Subscribed"),
                tagged("course:9"),
                Some(AppendCondition::new(query.clone(), read.position)),
            )
            .await
            .expect("decided while a transaction is open");
    }
    let stale = ReadPosition::after(outflow::Checkpoint::START);
    let refused = store
        .append_if(
            request("s-x", "Subscribed"),
            tagged("course:9"),
            Some(AppendCondition::new(query, stale)),
        )
        .await
        .expect_err("a stale read");
    assert!(refused.is_conflict());
    drop(long);
}

// ------------------------------------------------------- the property test

/// The queries of the property test (tags only: a held plain writer must
/// not block a condition on types, or the schedule would wait on itself).
fn queries() -> Vec<Query> {
    vec![
        Query::new().with(QueryItem::tags(["c:1"])),
        Query::new().with(QueryItem::tags(["c:2"])),
        Query::new().with(QueryItem::tags(["c:1", "s:1"])),
        Query::new()
            .with(QueryItem::tags(["s:1"]).with_types(["B"]))
            .with(QueryItem::tags(["c:2"]).with_types(["A"])),
    ]
}

const TAG_SETS: [&[&str]; 5] = [&[], &["c:1"], &["c:2"], &["c:1", "s:1"], &["s:1", "c:2"]];

#[derive(Debug, Clone)]
enum Op {
    /// Reads query `q` and remembers the position.
    Read(usize),
    /// Appends an event of type A or B with tag set `t`, on condition of
    /// query `q`'s last read (or of nothing yet read), committed or not.
    Conditional {
        q: usize,
        t: usize,
        b: bool,
        commit: bool,
    },
    /// Appends a tagged event without condition, committed or not.
    Plain { t: usize, b: bool, commit: bool },
    /// Opens a transaction with an untagged event, left open until the end.
    Hold,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4usize).prop_map(Op::Read),
        (
            0..4usize,
            0..5usize,
            any::<bool>(),
            prop::bool::weighted(0.8)
        )
            .prop_map(|(q, t, b, commit)| Op::Conditional { q, t, b, commit }),
        (0..5usize, any::<bool>(), prop::bool::weighted(0.8))
            .prop_map(|(t, b, commit)| Op::Plain { t, b, commit }),
        Just(Op::Hold),
    ]
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

async fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let db = common::TestDb::new("decision_property").await;
    let store = db.store().await;
    let queries = queries();
    // The model: committed events (type, tags) in commit order, and for
    // each query the number of committed events when it was last read.
    let mut committed: Vec<(String, Vec<String>)> = Vec::new();
    let mut reads: Vec<Option<(usize, ReadPosition)>> = vec![None; queries.len()];
    let mut held = Vec::new();
    for (n, op) in ops.into_iter().enumerate() {
        let stream = format!("s-{n}");
        match op {
            Op::Read(q) => {
                let read = store.read_query(&queries[q], None).await.expect("read");
                let expected = committed
                    .iter()
                    .filter(|(t, tags)| queries[q].matches(t, tags))
                    .count();
                prop_assert_eq!(read.events.len(), expected, "query {} read", q);
                reads[q] = Some((committed.len(), read.position));
            }
            Op::Conditional { q, t, b, commit } => {
                let event_type = if b { "B" } else { "A" };
                let tags: Vec<String> = TAG_SETS[t].iter().map(|s| (*s).to_owned()).collect();
                let (seen, position) = reads[q]
                    .clone()
                    .unwrap_or((0, ReadPosition::after(outflow::Checkpoint::START)));
                let should_fail = committed[seen..]
                    .iter()
                    .any(|(t, tags)| queries[q].matches(t, tags));
                let mut tx = store.begin().await.expect("begin");
                let result = store
                    .append_tagged_in(
                        &mut tx,
                        request(&stream, event_type),
                        vec![tags.clone()],
                        Some(&AppendCondition::new(queries[q].clone(), position)),
                    )
                    .await;
                match result {
                    Ok(_) => {
                        prop_assert!(!should_fail, "op {}: the condition should have failed", n);
                        if commit {
                            store.commit(tx).await.expect("commit");
                            let mut all = tags;
                            all.push(format!("thing:{stream}"));
                            committed.push((event_type.to_owned(), all));
                        }
                    }
                    Err(StoreError::ConditionFailed { .. }) => {
                        prop_assert!(should_fail, "op {}: the condition failed wrongly", n);
                    }
                    Err(other) => panic!("op {n}: {other}"),
                }
            }
            Op::Plain { t, b, commit } => {
                let event_type = if b { "B" } else { "A" };
                let tags: Vec<String> = TAG_SETS[t].iter().map(|s| (*s).to_owned()).collect();
                let mut tx = store.begin().await.expect("begin");
                store
                    .append_tagged_in(
                        &mut tx,
                        request(&stream, event_type),
                        vec![tags.clone()],
                        None,
                    )
                    .await
                    .expect("a plain tagged append");
                if commit {
                    store.commit(tx).await.expect("commit");
                    let mut all = tags;
                    all.push(format!("thing:{stream}"));
                    committed.push((event_type.to_owned(), all));
                }
            }
            Op::Hold => {
                let mut tx = store.begin().await.expect("begin");
                store
                    .append_in(&mut tx, request(&stream, "Held"))
                    .await
                    .expect("a held plain append");
                held.push(tx);
            }
        }
    }
    drop(held);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("OUTFLOW_PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(32),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn conditions_fail_exactly_when_a_matching_event_came_after_the_read(
        ops in prop::collection::vec(op(), 1..40)
    ) {
        runtime().block_on(run_case(ops))?;
    }
}
