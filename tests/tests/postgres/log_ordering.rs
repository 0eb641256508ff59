//! The global log's guarantees on PostgreSQL, with the dangerous
//! interleavings forced by holding transactions open on purpose:
//! (a) a transaction that commits late is never skipped, (b) no event is
//! delivered twice to a reader resuming from its checkpoint, (c) every
//! aggregate's events stay in sequence order.

use outflow_tests as common;

use outflow::EventLog;
use outflow::{AppendInTransaction, Transactional};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use outflow::{Checkpoint, EventStore, LogFilter, StoreError};

use common::deposits as request;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_that_commits_late_is_delivered_exactly_once_and_never_skipped() {
    let db = common::TestDb::new("held").await;
    let store = db.store().await;
    let all = LogFilter::all();
    for i in 0..5 {
        store
            .append(request("account", &format!("before-{i}"), 0, 1))
            .await
            .expect("append before");
    }
    let before = common::read_until(&store, Checkpoint::START, &all, 5).await;
    let checkpoint = before.last().expect("five events").checkpoint();

    // Hold a transaction with an appended event open...
    let mut held = store.pool().begin().await.expect("begin");
    let held_events = store
        .append_in(&mut held, request("account", "held", 0, 1))
        .await
        .expect("append in the held transaction");
    let held_event = &held_events[0];
    // ...while 100 later appends take higher positions and commit.
    for i in 0..100 {
        let written = store
            .append(request("account", &format!("later-{i}"), 0, 1))
            .await
            .expect("append later");
        assert!(written[0].position > held_event.position);
    }

    // A reader that trusts positions alone passes the held event: it has
    // already seen positions after it, and will never look back.
    let naive: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM events WHERE position > $1 ORDER BY position")
            .bind(before.last().expect("five").position as i64)
            .fetch_all(store.pool())
            .await
            .expect("naive read");
    assert_eq!(
        naive.len(),
        100,
        "the naive reader sees the 100 later events"
    );
    assert!(!naive.contains(&(held_event.position as i64)));

    // Outflow's reader does not pass it, however often it looks.
    for _ in 0..5 {
        let seen = store
            .read_log(checkpoint, &all, 1000)
            .await
            .expect("read while held");
        assert!(
            seen.is_empty(),
            "the reader passed an open transaction: {:?}",
            seen.iter().map(|e| e.position).collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(store.head().await.expect("head") <= checkpoint);

    held.commit().await.expect("commit the held transaction");
    let after = common::read_until(&store, checkpoint, &all, 101).await;
    assert_eq!(after.len(), 101);
    assert_eq!(
        after[0].event_id, held_event.event_id,
        "the held event comes first"
    );
    let ids: HashSet<_> = after.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 101, "no event twice");
    let rest = store
        .read_log(after[100].checkpoint(), &all, 1000)
        .await
        .expect("read after the end");
    assert!(rest.is_empty(), "nothing is delivered again");

    // The naive reader, resuming from its own checkpoint, has lost the event.
    let naive_rest: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM events WHERE position > $1 ORDER BY position")
            .bind(naive.last().copied().unwrap_or_default())
            .fetch_all(store.pool())
            .await
            .expect("naive read");
    assert!(naive_rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_transaction_that_wrote_first_cannot_put_a_stream_out_of_order() {
    let db = common::TestDb::new("stale").await;
    let store = db.store().await;
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY)")
        .execute(store.pool())
        .await
        .expect("create orders");

    // A writes a row of its own first: its transaction id is taken now.
    let mut a = store.pool().begin().await.expect("begin A");
    sqlx::query("INSERT INTO orders VALUES (1)")
        .execute(&mut *a)
        .await
        .expect("A's own row");
    let a_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *a)
        .await
        .expect("A's xid");

    // B appends x#1 and commits meanwhile; its transaction id is newer.
    let b = store
        .append(request("account", "x", 0, 1))
        .await
        .expect("B appends");
    assert!(
        a_xid.parse::<u64>().expect("xid") < b[0].transaction_id,
        "the interleaving that would invert the stream in (xid, position) order"
    );

    // A appends x#2: refused, because the log would order it before x#1.
    match store.append_in(&mut a, request("account", "x", 1, 1)).await {
        Err(error @ StoreError::StaleTransaction { .. }) => {
            assert!(error.is_retryable());
            assert!(error.to_string().contains("`x`"), "{error}");
        }
        other => panic!("expected StaleTransaction, got {other:?}"),
    }
    a.rollback().await.expect("rollback A");

    // Retrying the whole transaction works.
    let mut retry = store.pool().begin().await.expect("begin retry");
    sqlx::query("INSERT INTO orders VALUES (1)")
        .execute(&mut *retry)
        .await
        .expect("own row again");
    store
        .append_in(&mut retry, request("account", "x", 1, 1))
        .await
        .expect("append x#2");
    store.commit(retry).await.expect("commit retry");

    let log = common::read_until(&store, Checkpoint::START, &LogFilter::all(), 2).await;
    let sequences: Vec<u64> = log.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, vec![1, 2]);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(
        orders, 1,
        "the refused transaction's own row rolled back with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_restarted_from_any_checkpoint_gets_exactly_the_rest() {
    const TASKS: usize = 8;
    const COMMANDS: u64 = 125;
    const PER_COMMAND: u64 = 10;
    const TOTAL: usize = TASKS * COMMANDS as usize * PER_COMMAND as usize;
    let db = common::TestDb::new("restart").await;
    let store = db.store().await;

    // Eight concurrent writers, so transactions interleave and commit out of
    // position order; two aggregate types, 48 aggregates.
    let mut writers = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut versions = [0u64; 6];
            for n in 0..COMMANDS {
                let k = (n as usize) % 6;
                let kind = if matches!(k, 0 | 2 | 4) {
                    "alpha"
                } else {
                    "beta"
                };
                store
                    .append(request(
                        kind,
                        &format!("agg-{task}-{k}"),
                        versions[k],
                        PER_COMMAND,
                    ))
                    .await
                    .expect("append");
                versions[k] += PER_COMMAND;
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }

    let all = LogFilter::all();
    let log = common::read_until(&store, Checkpoint::START, &all, TOTAL).await;
    assert_eq!(log.len(), TOTAL);
    let ids: HashSet<_> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), TOTAL, "every event exactly once");
    let mut last_sequence: HashMap<(&str, &str), u64> = HashMap::new();
    for event in &log {
        let last = last_sequence
            .entry((&event.aggregate_type, &event.aggregate_id))
            .or_default();
        assert_eq!(
            event.sequence,
            *last + 1,
            "stream order of {}",
            event.aggregate_id
        );
        *last = event.sequence;
    }
    for pair in log.windows(2) {
        assert!(
            pair[0].checkpoint() < pair[1].checkpoint(),
            "log order is strict"
        );
    }

    // From every checkpoint, the next events are exactly the following ones.
    let starts: Vec<Checkpoint> = std::iter::once(Checkpoint::START)
        .chain(log.iter().map(|e| e.checkpoint()))
        .collect();
    for (i, start) in starts.iter().enumerate() {
        let next = store.read_log(*start, &all, 7).await.expect("read");
        let expected: Vec<_> = log[i..].iter().take(7).map(|e| e.event_id).collect();
        let got: Vec<_> = next.iter().map(|e| e.event_id).collect();
        assert_eq!(got, expected, "after checkpoint #{i} {start}");
    }

    // Whole-rest reads through the batching stream, from a spread of checkpoints.
    for i in (0..=TOTAL).step_by(997) {
        let rest: Vec<_> = outflow::log::read_log(&store, starts[i], all.clone(), 333)
            .try_collect()
            .await
            .expect("stream the rest");
        assert_eq!(rest.len(), TOTAL - i);
        assert!(rest
            .iter()
            .zip(&log[i..])
            .all(|(a, b)| a.event_id == b.event_id));
    }

    // The same holds for a reader of one aggregate type.
    let beta = LogFilter::aggregate_types(["beta"]);
    let beta_log: Vec<_> = log.iter().filter(|e| e.aggregate_type == "beta").collect();
    for i in (0..beta_log.len()).step_by(211) {
        let rest: Vec<_> =
            outflow::log::read_log(&store, beta_log[i].checkpoint(), beta.clone(), 250)
                .try_collect()
                .await
                .expect("stream beta");
        assert_eq!(rest.len(), beta_log.len() - i - 1);
        assert!(rest.iter().all(|e| e.aggregate_type == "beta"));
        assert!(rest
            .iter()
            .zip(&beta_log[i + 1..])
            .all(|(a, b)| a.event_id == b.event_id));
    }
    let deposits_of_alpha =
        LogFilter::aggregate_types(["alpha", "gamma"]).with_event_types(["Deposited"]);
    let alpha: Vec<_> = outflow::log::read_log(&store, Checkpoint::START, deposits_of_alpha, 500)
        .try_collect()
        .await
        .expect("stream alpha");
    assert_eq!(alpha.len(), TOTAL - beta_log.len());
    assert_eq!(
        store.head().await.expect("head"),
        log[TOTAL - 1].checkpoint()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_read_reports_a_database_error_instead_of_ending() {
    let db = common::TestDb::new("stream_error").await;
    let store = db.store().await;
    for i in 0..10 {
        store
            .append(request("account", &format!("s-{i}"), 0, 1))
            .await
            .expect("append");
    }
    common::read_until(&store, Checkpoint::START, &LogFilter::all(), 10).await;
    let mut stream = outflow::log::read_log(&store, Checkpoint::START, LogFilter::all(), 3);
    for _ in 0..3 {
        stream
            .try_next()
            .await
            .expect("the first batch reads")
            .expect("an event");
    }
    // The table disappears between two batches.
    sqlx::query("ALTER TABLE events RENAME TO events_gone")
        .execute(store.pool())
        .await
        .expect("rename");
    match stream.try_next().await {
        Err(StoreError::Database { operation, .. }) => {
            assert_eq!(operation, "reading the global log")
        }
        other => panic!("the stream must report the failure, got {other:?}"),
    }
    assert!(
        stream.try_next().await.expect("ended").is_none(),
        "then it ends"
    );

    let mut one = outflow::store::read_stream(&store, "account", "s-1", 0, 10);
    assert!(
        matches!(one.try_next().await, Err(StoreError::Database { .. })),
        "a stream read reports it too"
    );
}

/// One look at the log (`read_window`, one statement on PostgreSQL): the
/// head and the window agree, a full window is not complete, a row that
/// does not decode makes a short window incomplete, and a transaction that
/// holds committed events back is reported, so a reader looks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_reports_its_head_completeness_and_events_held_back() {
    let db = common::TestDb::new("window").await;
    let store = db.store().await;
    let all = LogFilter::all();

    let empty = store
        .read_window(Checkpoint::START, &all, 10)
        .await
        .expect("an empty log");
    assert_eq!(empty.head, Checkpoint::START);
    assert!(empty.events.is_empty() && empty.complete && !empty.held_back);

    for i in 0..3 {
        store
            .append(request("account", &format!("w-{i}"), 0, 1))
            .await
            .expect("append");
    }
    // Readable at once — unless another test's transaction on this shared
    // server holds every reader back for a while: wait for them.
    let (short, _) = common::eventually("three events", Duration::from_secs(60), || {
        let store = store.clone();
        let all = all.clone();
        async move {
            let window = store
                .read_window(Checkpoint::START, &all, 10)
                .await
                .map_err(|e| e.to_string())?;
            if window.events.len() == 3 {
                Ok(window)
            } else {
                Err(format!("{window:?}"))
            }
        }
    })
    .await;
    assert_eq!(short.events.len(), 3);
    assert_eq!(short.head, short.events[2].checkpoint());
    assert!(short.complete && !short.held_back);
    let full = store
        .read_window(Checkpoint::START, &all, 3)
        .await
        .expect("a full window");
    assert_eq!(full.events.len(), 3);
    assert!(!full.complete, "a full window may have more after it");
    // Filtered: the head is the log's, the window only what is wanted.
    let other = store
        .read_window(Checkpoint::START, &LogFilter::aggregate_types(["user"]), 10)
        .await
        .expect("a filtered window");
    assert!(other.events.is_empty() && other.complete);
    assert_eq!(other.head, short.head);

    // Held back: an open transaction with an id, then a later commit.
    let mut held = store.pool().begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *held)
        .await
        .expect("take a transaction id");
    store
        .append(request("account", "later", 0, 1))
        .await
        .expect("append later");
    let waiting = store
        .read_window(short.head, &all, 10)
        .await
        .expect("a window behind the open transaction");
    assert!(waiting.events.is_empty(), "{:?}", waiting.events);
    assert_eq!(waiting.head, short.head);
    assert!(waiting.held_back, "the later event waits behind it");
    held.rollback().await.expect("roll back");
    // Readable once it ended — or, on a server that other tests share, once
    // their open transactions (which hold every reader on the server back,
    // whatever the database) end too: wait for it.
    let (released, _) = common::eventually(
        "the later event, after the transaction ended",
        Duration::from_secs(60),
        || {
            let store = store.clone();
            let all = all.clone();
            async move {
                let window = store
                    .read_window(short.head, &all, 10)
                    .await
                    .map_err(|e| e.to_string())?;
                if window.events.len() == 1 {
                    Ok(window)
                } else {
                    Err(format!("{window:?}"))
                }
            }
        },
    )
    .await;
    assert!(released.complete && !released.held_back);

    // A row whose metadata does not decode, between two good ones: the
    // window stops before it and is not complete.
    store
        .append(request("account", "good-1", 0, 1))
        .await
        .expect("append");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('account', 'bad', 1, 'Deposited', '1.0', '{}', '[1]')",
    )
    .execute(store.pool())
    .await
    .expect("insert a bad row");
    store
        .append(request("account", "good-2", 0, 1))
        .await
        .expect("append");
    let cut = store
        .read_window(released.head, &all, 10)
        .await
        .expect("a window cut by the bad row");
    assert_eq!(cut.events.len(), 1, "{:?}", cut.events);
    assert_eq!(cut.events[0].aggregate_id, "good-1");
    assert!(!cut.complete, "a good event follows the bad row");
}
