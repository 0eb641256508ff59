//! A lost acknowledgement of COMMIT: the server committed a batch (its
//! read-model writes and its checkpoint), but the client saw an error, as
//! when the connection drops between the server's COMMIT and its reply. The
//! runner retries the batch; the checkpoint's compare-and-set (`from` must
//! still be the stored checkpoint) refuses the retry, and the runner goes on
//! from the stored checkpoint: a non-idempotent read model sees every event
//! exactly once.

use outflow_tests as common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outflow::log::OldestTransaction;
use outflow::projection::{HandlerError, Projection, ProjectionOptions, RetryPolicy};
use outflow::runner::ProjectionRunner;
use outflow::store::{
    Checkpoints, DeadLetter, DeadLetters, Inbox, Lease, Leases, NewDeadLetter, ProjectionState,
    UnitError, UnitId, UnitRecord,
};
use outflow::{
    AppendRequest, Checkpoint, ErrorKind, EventLog, EventStore, LogFilter, NewEvent, PostgresStore,
    RecordedEvent, StoreError, Transactional, Wakeups,
};
use serde_json::json;
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// Events appended.
const EVENTS: usize = 300;
/// Events per batch: many batches, so many commits.
const BATCH: usize = 7;
/// Every `LOSE_EVERY`-th checkpoint-moving commit loses its acknowledgement...
const LOSE_EVERY: usize = 3;
/// ... among the first `LOSE_WITHIN` of them.
const LOSE_WITHIN: usize = 30;

/// [`PostgresStore`] whose commits of batches that moved a checkpoint
/// sometimes report a lost connection after the server committed.
#[derive(Clone)]
struct LostAck {
    inner: PostgresStore,
    /// Set by a `save_checkpoint` that moved a checkpoint over events, taken
    /// by the next `commit`. The test runs one unit, so batches never
    /// interleave.
    moved: Arc<AtomicBool>,
    /// Commits of transactions that moved a checkpoint.
    commits: Arc<AtomicUsize>,
    /// Acknowledgements "lost" (the commit went through, the caller got an error).
    lost: Arc<AtomicUsize>,
    /// Checkpoint writes refused because the checkpoint had moved.
    refused: Arc<AtomicUsize>,
}

impl LostAck {
    fn new(inner: PostgresStore) -> Self {
        LostAck {
            inner,
            moved: Arc::default(),
            commits: Arc::default(),
            lost: Arc::default(),
            refused: Arc::default(),
        }
    }
}

#[async_trait]
impl Transactional for LostAck {
    type Transaction = Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Transaction, StoreError> {
        self.moved.store(false, Ordering::SeqCst);
        self.inner.begin().await
    }

    async fn commit(&self, tx: Self::Transaction) -> Result<(), StoreError> {
        let moved = self.moved.swap(false, Ordering::SeqCst);
        self.inner.commit(tx).await?;
        if moved {
            let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
            if n <= LOSE_WITHIN && n.is_multiple_of(LOSE_EVERY) {
                self.lost.fetch_add(1, Ordering::SeqCst);
                return Err(StoreError::database(
                    "committing",
                    ErrorKind::Transient,
                    std::io::Error::other("connection lost after COMMIT"),
                ));
            }
        }
        Ok(())
    }

    fn classify(&self, error: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
        self.inner.classify(error)
    }
}

#[async_trait]
impl Checkpoints for LostAck {
    async fn register_projection(&self, name: &str, partitions: u32) -> Result<(), StoreError> {
        self.inner.register_projection(name, partitions).await
    }

    async fn save_checkpoint(
        &self,
        tx: &mut Self::Transaction,
        lease: &Lease,
        from: Checkpoint,
        to: Checkpoint,
        processed: u64,
    ) -> Result<bool, StoreError> {
        let saved = self
            .inner
            .save_checkpoint(tx, lease, from, to, processed)
            .await?;
        if saved && processed > 0 {
            self.moved.store(true, Ordering::SeqCst);
        }
        if !saved {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        Ok(saved)
    }

    async fn set_state(
        &self,
        lease: &Lease,
        state: ProjectionState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.inner.set_state(lease, state, error).await
    }

    async fn record_state(
        &self,
        lease: &Lease,
        state: ProjectionState,
        error: Option<UnitError<'_>>,
    ) -> Result<(), StoreError> {
        self.inner.record_state(lease, state, error).await
    }

    async fn units(&self, projection: Option<&str>) -> Result<Vec<UnitRecord>, StoreError> {
        self.inner.units(projection).await
    }

    async fn reset_projection(
        &self,
        tx: &mut Self::Transaction,
        name: &str,
        rebuild_total: u64,
    ) -> Result<(), StoreError> {
        self.inner.reset_projection(tx, name, rebuild_total).await
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        self.inner.set_paused(name, paused).await
    }

    async fn restart_projection(&self, name: &str) -> Result<(), StoreError> {
        self.inner.restart_projection(name).await
    }

    fn signal_checkpoints(&self) {
        self.inner.signal_checkpoints();
    }

    fn checkpoint_wakeups(&self) -> Wakeups {
        self.inner.checkpoint_wakeups()
    }
}

#[async_trait]
impl Leases for LostAck {
    async fn node_heartbeat(&self, node: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        self.inner.node_heartbeat(node, ttl).await
    }

    async fn claim(
        &self,
        unit: &UnitId,
        node: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.inner.claim(unit, node, ttl).await
    }

    async fn renew(&self, node: &str, ttl: Duration) -> Result<Vec<Lease>, StoreError> {
        self.inner.renew(node, ttl).await
    }

    async fn release(&self, lease: &Lease, node: &str) -> Result<(), StoreError> {
        self.inner.release(lease, node).await
    }
}

#[async_trait]
impl DeadLetters for LostAck {
    async fn park(
        &self,
        tx: &mut Self::Transaction,
        dead_letter: NewDeadLetter<'_>,
    ) -> Result<(), StoreError> {
        self.inner.park(tx, dead_letter).await
    }

    async fn dead_letters(&self, projection: &str) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters(projection).await
    }

    async fn take_dead_letter(
        &self,
        tx: &mut Self::Transaction,
        id: u64,
    ) -> Result<Option<DeadLetter>, StoreError> {
        self.inner.take_dead_letter(tx, id).await
    }

    async fn note_dead_letter_failure(&self, id: u64, error: &str) -> Result<(), StoreError> {
        self.inner.note_dead_letter_failure(id, error).await
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        self.inner.discard_dead_letter(id).await
    }
}

#[async_trait]
impl Inbox for LostAck {
    async fn inbox_claim(
        &self,
        tx: &mut Self::Transaction,
        handler: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        self.inner.inbox_claim(tx, handler, message_id).await
    }
}

#[async_trait]
impl EventLog for LostAck {
    async fn read_log(
        &self,
        after: Checkpoint,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_log(after, filter, limit).await
    }

    async fn head(&self) -> Result<Checkpoint, StoreError> {
        self.inner.head().await
    }

    fn wakeups(&self) -> Wakeups {
        self.inner.wakeups()
    }

    async fn count_events(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
        upto: Checkpoint,
        cap: u64,
    ) -> Result<u64, StoreError> {
        self.inner.count_events(filter, after, upto, cap).await
    }

    async fn first_pending_recorded_at(
        &self,
        filter: &LogFilter,
        after: Checkpoint,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.inner.first_pending_recorded_at(filter, after).await
    }

    async fn oldest_open_transaction(&self) -> Result<Option<OldestTransaction>, StoreError> {
        self.inner.oldest_open_transaction().await
    }
}

/// Adds each event to a one-row total: not idempotent, so an event applied
/// twice shows in the count and the sum. Counts the events it was given,
/// committed or not.
struct Totals {
    handled: Arc<AtomicUsize>,
}

#[async_trait]
impl Projection<LostAck> for Totals {
    fn name(&self) -> &str {
        "totals"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["meter"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        self.handled.fetch_add(events.len(), Ordering::SeqCst);
        for event in events {
            let amount = event.payload["amount"]
                .as_i64()
                .ok_or_else(|| HandlerError::msg(format!("no amount in {}", event.payload)))?;
            sqlx::query("UPDATE totals SET n = n + 1, amount = amount + $1")
                .bind(amount)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

fn amount(i: usize) -> i64 {
    (i % 17) as i64 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_whose_commit_ack_was_lost_is_not_applied_twice() {
    let db = common::TestDb::new("lost_ack").await;
    let store = db.store().await;
    sqlx::query("CREATE TABLE totals (n bigint NOT NULL, amount bigint NOT NULL)")
        .execute(store.pool())
        .await
        .expect("create `totals`");
    sqlx::query("INSERT INTO totals VALUES (0, 0)")
        .execute(store.pool())
        .await
        .expect("insert the total row");

    // 300 events in commands of 1 to 4 events over 5 meters, so batches
    // are cut at transaction boundaries as well as at the batch size.
    let mut next = 0usize;
    let mut versions = [0u64; 5];
    let mut last = Checkpoint::START;
    let mut commands = 0usize;
    while next < EVENTS {
        let size = (commands % 4 + 1).min(EVENTS - next);
        let meter = commands % versions.len();
        let events = (next..next + size)
            .map(|i| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "Measured".into(),
                event_version: "1.0".into(),
                payload: json!({ "amount": amount(i) }),
                metadata: Default::default(),
                correlation_id: None,
                causation_id: None,
            })
            .collect();
        let written = store
            .append(AppendRequest {
                aggregate_type: "meter".into(),
                aggregate_id: format!("meter-{meter}"),
                expected_version: versions[meter],
                events,
            })
            .await
            .expect("append");
        assert_eq!(written.len(), size);
        versions[meter] += size as u64;
        last = written.last().expect("written").checkpoint();
        next += size;
        commands += 1;
    }
    let expected_sum: i64 = (0..EVENTS).map(amount).sum();

    let lost_ack = LostAck::new(store.clone());
    let handled = Arc::new(AtomicUsize::new(0));
    let runner = ProjectionRunner::builder(lost_ack.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(3))
        .projection(
            ProjectionOptions::new(Totals {
                handled: handled.clone(),
            })
            .batch_size(BATCH)
            .retry(RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(100),
            }),
        )
        .build()
        .expect("build the runner");
    let (shutdown, handle) = common::start_runner(&runner);
    runner
        .wait_for(last, &["totals"], Duration::from_secs(60))
        .await
        .expect("the projection reaches the last event");

    let (n, sum): (i64, i64) = sqlx::query_as("SELECT n, amount FROM totals")
        .fetch_one(store.pool())
        .await
        .expect("read `totals`");
    let lost = lost_ack.lost.load(Ordering::SeqCst);
    let commits = lost_ack.commits.load(Ordering::SeqCst);
    assert!(
        lost >= 10,
        "only {lost} lost acknowledgements injected in {commits} commits"
    );
    assert_eq!(
        (n, sum),
        (EVENTS as i64, expected_sum),
        "the read model is not the fold of the log ({lost} lost acks in {commits} commits)"
    );
    // Every batch whose acknowledgement was lost was tried again, and its
    // checkpoint write (the first statement of its transaction) was refused
    // before its handler ran: no event reached the handler twice.
    let refused = lost_ack.refused.load(Ordering::SeqCst);
    assert!(
        refused >= lost,
        "{refused} refused checkpoint writes for {lost} lost acknowledgements"
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        EVENTS,
        "a retried batch reached the handler"
    );
    let units = store.units(Some("totals")).await.expect("units");
    assert_eq!(units.len(), 1, "{units:?}");
    assert_eq!(units[0].processed, EVENTS as u64, "{units:?}");
    assert!(units[0].checkpoint >= last, "{units:?}");
    assert!(
        runner
            .dead_letters("totals")
            .await
            .expect("dead letters")
            .is_empty(),
        "a lost acknowledgement parked an event"
    );
    let status = common::wait_for_status(&runner, "totals", |s| {
        s.state == ProjectionState::Live && s.last_error.is_none()
    })
    .await;
    assert_eq!(status.lag_events, 0, "{status:?}");
    assert_eq!(status.parked, 0, "{status:?}");

    common::stop_runner(shutdown, handle).await;
}
