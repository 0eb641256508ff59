//! The transactional outbox: messages commit or roll back with the caller's
//! own rows; the relay delivers every committed message at least once, in
//! order per key, under concurrent writers, with a sink that fails at random,
//! across restarts and across a relay that dies; delivered messages are
//! deleted after the retention, pending ones never. The suites run on
//! PostgreSQL and on SQLite (`on_both_backends!`); what only PostgreSQL has —
//! transactions committing out of id order (forced by holding one open), the
//! enqueue guard, `NOTIFY` between nodes, a restore into another cluster — is
//! tested on PostgreSQL below them.

use outflow_tests as common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::outbox::{
    delivered_ids, message, relay, send, until_delivered, Log, Recorder, Running,
};
use outflow::outbox::{InProcessSink, Outbox, OutboxMessage, OutboxMessageRecord, OutboxStore};
use outflow::projection::HandlerError;
use outflow::store::ProjectionState;
use outflow::{PostgresStore, SqliteStore, StoreError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod suites;
use suites::*;
mod postgres;

/// What the suites need of a backend besides the outbox: plain SQL for the
/// application's own rows and for looking at the tables.
#[async_trait::async_trait]
trait Sql: OutboxStore + Clone {
    /// Runs `sql` (no parameters) on its own.
    async fn exec(&self, sql: &str);
    /// Runs `sql` (no parameters) inside `tx`.
    async fn exec_in(&self, tx: &mut sqlx::Transaction<'static, Self::Database>, sql: &str);
    /// A count (`sql` selects one integer).
    async fn count(&self, sql: &str) -> i64;
}

#[async_trait::async_trait]
impl Sql for PostgresStore {
    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(self.pool()).await.expect(sql);
    }
    async fn exec_in(&self, tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, sql: &str) {
        sqlx::query(sql).execute(&mut **tx).await.expect(sql);
    }
    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool())
            .await
            .expect(sql)
    }
}

#[async_trait::async_trait]
impl Sql for SqliteStore {
    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(self.writer()).await.expect(sql);
    }
    async fn exec_in(&self, tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>, sql: &str) {
        sqlx::query(sql).execute(&mut **tx).await.expect(sql);
    }
    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool())
            .await
            .expect(sql)
    }
}

/// One test per suite and backend: `$suite(store)` on a `PostgresStore` in
/// a fresh database and on a `SqliteStore` in a fresh file.
macro_rules! on_both_backends {
    ($($suite:ident: $postgres:ident, $sqlite:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $postgres() {
            let db = common::TestDb::new("outbox").await;
            $suite(db.store().await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $sqlite() {
            let dir = common::TestDir::new("outbox");
            $suite(dir.sqlite().await).await;
        }
    )*};
}

on_both_backends! {
    atomic_with_own_rows: committed_delivered_rolled_back_never_pg, committed_delivered_rolled_back_never_sqlite;
    refuses_bad_messages: bad_messages_refused_pg, bad_messages_refused_sqlite;
    concurrent_writers: concurrent_writers_in_order_per_key_pg, concurrent_writers_in_order_per_key_sqlite;
    sink_failing_at_random: random_sink_failures_in_order_per_key_pg, random_sink_failures_in_order_per_key_sqlite;
    restarted_relay_resumes: restarted_relay_resumes_pg, restarted_relay_resumes_sqlite;
    one_relay_at_a_time: one_relay_at_a_time_and_failover_pg, one_relay_at_a_time_and_failover_sqlite;
    cleanup_keeps_pending: cleanup_keeps_pending_pg, cleanup_keeps_pending_sqlite;
    failing_sink_shows_in_status: failing_sink_retried_and_shown_pg, failing_sink_retried_and_shown_sqlite;
}

/// Polls `probe` until it returns `Some`, failing after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// The suites, on both backends.
// ---------------------------------------------------------------------------

/// A message committed with the caller's own row is delivered exactly as
/// enqueued; one whose transaction rolled back never exists, and neither does
/// the row.
async fn atomic_with_own_rows<S: Sql>(store: S) {
    store
        .exec("CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL)")
        .await;
    let outbox = Outbox::new(&store).await.expect("outbox");
    assert_eq!(outbox.table(), "events_outbox");

    // Save the user row and publish `UserSignedUp` atomically.
    let signed_up = OutboxMessage::new(
        "user-1",
        "users.signed_up",
        json!({
            "id": 1,
            "email": "ada@example.com",
            "name": "Ada Lovelace — «ʎʇᴉɔᴉldɯᴉs»",
            "tags": ["a", "b"],
            "balance": 12.5,
            "big": u64::MAX,
            "nested": { "null": null, "empty": {}, "escaped": "tab\tquote\"nul\u{0}" }
        }),
    )
    .header("content-type", "application/json")
    .header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let mut tx = outbox.begin().await.expect("begin");
    store
        .exec_in(&mut tx, "INSERT INTO users VALUES (1, 'ada@example.com')")
        .await;
    let id = outbox
        .enqueue(&mut tx, signed_up.clone())
        .await
        .expect("enqueue");
    assert_eq!(id, signed_up.message_id);
    outbox.commit(tx).await.expect("commit");

    // The same in a transaction that rolls back.
    let mut tx = outbox.begin().await.expect("begin");
    store
        .exec_in(&mut tx, "INSERT INTO users VALUES (2, 'bob@example.com')")
        .await;
    let rolled_back = outbox
        .enqueue(
            &mut tx,
            OutboxMessage::new("user-2", "users.signed_up", json!({ "id": 2 })),
        )
        .await
        .expect("enqueue in the doomed transaction");
    tx.rollback().await.expect("rollback");

    let last = send(&outbox, "user-3", 3).await;

    let log: Log = Arc::default();
    let sink = InProcessSink::new({
        let log = log.clone();
        move |batch: Vec<OutboxMessageRecord>| {
            let log = log.clone();
            async move {
                let mut log = log.lock().map_err(|_| HandlerError::msg("poisoned"))?;
                log.extend(batch.into_iter().map(|m| ("in-process".to_owned(), m)));
                Ok(())
            }
        }
    });
    let running = Running::start(relay(&outbox, "relay-a", sink));
    until_delivered(&log, &[id, last]).await;
    // Give a wrongly delivered message time to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.stop().await;

    let delivered: Vec<OutboxMessageRecord> = log
        .lock()
        .expect("log")
        .iter()
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(
        delivered.iter().map(|m| m.message_id).collect::<Vec<_>>(),
        vec![id, last],
        "exactly the committed messages, once each, in order"
    );
    assert!(!delivered.iter().any(|m| m.message_id == rolled_back));
    let first = &delivered[0];
    assert_eq!(first.payload, signed_up.payload, "the payload, exactly");
    assert_eq!(first.headers, signed_up.headers, "the headers, exactly");
    assert_eq!(first.key, "user-1");
    assert_eq!(first.topic, "users.signed_up");
    assert!(first.checkpoint() < delivered[1].checkpoint());

    assert_eq!(
        store.count("SELECT count(*) FROM users").await,
        1,
        "the rolled-back user row is absent"
    );
    assert_eq!(
        store.count("SELECT count(*) FROM events_outbox").await,
        2,
        "the rolled-back message never existed"
    );
    assert_eq!(
        store
            .count("SELECT count(*) FROM events_outbox WHERE delivered_at IS NULL")
            .await,
        0,
        "delivered messages are marked delivered"
    );

    let status = outbox.status().await.expect("status");
    assert_eq!(status.pending, 0);
    assert_eq!(status.oldest_pending_age, None);
    assert_eq!(status.delivered, 2);
    assert_eq!(status.cursor, delivered[1].checkpoint());
    assert_eq!(status.relay, None, "the stopped relay gave its lease back");
}

/// Messages the outbox cannot keep are refused with a typed error that is
/// not retryable; another store's events table is refused at build.
async fn refuses_bad_messages<S: Sql>(store: S) {
    match Outbox::builder(&store)
        .events_table("other_events")
        .build()
        .await
    {
        Err(StoreError::Config(message)) => {
            assert!(message.to_string().contains("`other_events`"), "{message}")
        }
        other => panic!("an events table that is not the store's was accepted: {other:?}"),
    }
    match Outbox::builder(&store)
        .events_table("events; DROP TABLE x")
        .build()
        .await
    {
        Err(StoreError::InvalidIdentifier { what, .. }) => assert_eq!(what, "events table"),
        other => panic!("expected InvalidIdentifier, got {other:?}"),
    }
    let outbox = Outbox::new(&store).await.expect("outbox");
    assert_eq!(outbox.unit().projection, "outbox:events_outbox");
    let bad = [
        OutboxMessage::new("", "t", json!(1)),
        OutboxMessage::new("k", "", json!(1)),
        OutboxMessage::new("k\0", "t", json!(1)),
        OutboxMessage::new("k", "t", json!(1)).header("h", "nul\0"),
        OutboxMessage::new("k".repeat(1025), "t", json!(1)),
    ];
    for message in bad {
        match outbox.send(message.clone()).await {
            Err(error @ StoreError::InvalidAppend { .. }) => {
                assert!(!error.is_retryable(), "{error}");
                assert!(error.to_string().contains("events_outbox"), "{error}");
            }
            other => panic!("{message:?} was not refused: {other:?}"),
        }
    }
    assert_eq!(store.count("SELECT count(*) FROM events_outbox").await, 0);
}
