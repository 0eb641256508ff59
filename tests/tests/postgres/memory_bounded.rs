//! Memory stays bounded over a long log: a projection replays 1,000,000
//! events and the JetStream relay publishes 200,000 (1,000,000 with
//! `OUTFLOW_SOAK=1`), and this process's peak resident memory stays far
//! below what holding the events would take. The events are written with
//! one SQL statement per 100,000, so the test's process never holds them.

use outflow_tests as common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::relay::{ensure_stream, JetStreamRelay};
use outflow::runner::ProjectionRunner;
use outflow::{EventLog, PostgresStore, RecordedEvent};
use sqlx::{Postgres, Transaction};

const PROJECTED: u64 = 1_000_000;
/// The peak resident memory allowed above the process's size before the
/// replay: the events themselves would take several hundred MB.
const BOUND_MB: u64 = 150;

/// The process's peak resident set (VmHWM), in MB.
fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Counts events; writes nothing but its checkpoint.
struct Count(Arc<AtomicU64>);

#[outflow::async_trait]
impl Projection<PostgresStore> for Count {
    fn name(&self) -> &str {
        "count"
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        self.0.fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes `count` deposits over 1,000 accounts, 100,000 per statement.
async fn seed(store: &PostgresStore, count: u64) {
    let mut start = 0u64;
    while start < count {
        let end = (start + 100_000).min(count);
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) \
             SELECT 'account', 'acc-' || (g % 1000), g / 1000 + 1, 'Deposited', '1.0', \
                    json_build_object('Deposited', json_build_object('amount', g % 100, \
                        'memo', 'a deposit with a memo long enough to matter')), '{}' \
               FROM generate_series($1::bigint, $2::bigint - 1) AS g",
        )
        .bind(start as i64)
        .bind(end as i64)
        .execute(store.pool())
        .await
        .expect("seed events");
        start = end;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_and_a_relay_over_a_long_log_hold_bounded_memory() {
    let relayed: u64 = if std::env::var_os("OUTFLOW_SOAK").is_some() {
        1_000_000
    } else {
        200_000
    };
    let db = common::TestDb::new("memory").await;
    let store = db.store().await;
    seed(&store, PROJECTED).await;
    let head = store.committed_head().await.expect("head");
    let baseline = peak_rss_mb();

    // A projection over the whole log.
    let counted = Arc::new(AtomicU64::new(0));
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(Count(counted.clone())).batch_size(2_000))
        .build()
        .expect("runner");
    let started = Instant::now();
    let (stop, task) = common::start_runner(&runner);
    runner
        .wait_for(head, &["count"], Duration::from_secs(600))
        .await
        .expect("the projection replayed the log");
    common::stop_runner(stop, task).await;
    let projected_in = started.elapsed();
    assert_eq!(counted.load(Ordering::Relaxed), PROJECTED);
    let after_projection = peak_rss_mb();

    // The relay over the first `relayed` events.
    let js = common::nats::jetstream(&std::env::var("NATS_URL").expect(
        "NATS_URL is not set: run the tests with scripts/test.sh, which starts nats-server",
    ))
    .await;
    let suffix = &db.name[db.name.len() - 8..];
    let stream = format!("MEMORY_{suffix}");
    ensure_stream(
        &js,
        &stream,
        vec![format!("memory_{suffix}.>")],
        Duration::from_secs(60),
    )
    .await
    .expect("stream");
    // Positions are 1, 2, …: the relay is done with the first `relayed`
    // events once its checkpoint reaches position `relayed`.
    let relay = JetStreamRelay::builder(js.clone(), "relay")
        .subject_prefix(format!("memory_{suffix}"))
        .build()
        .expect("relay");
    let relay_runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(relay).batch_size(1_000))
        .build()
        .expect("runner");
    let started = Instant::now();
    let (stop, task) = common::start_runner(&relay_runner);
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let status = relay_runner.status().await.expect("status");
        if status
            .first()
            .is_some_and(|s| s.checkpoint.position >= relayed)
        {
            break;
        }
        assert!(Instant::now() < deadline, "relayed too slowly: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    common::stop_runner(stop, task).await;
    let relayed_in = started.elapsed();
    let published = js
        .get_stream(&stream)
        .await
        .expect("the stream")
        .info()
        .await
        .expect("stream info")
        .state
        .messages;
    assert!(published >= relayed, "{published} of {relayed} published");
    let peak = peak_rss_mb();
    js.delete_stream(&stream).await.expect("drop the stream");

    println!(
        "projection: {PROJECTED} events in {projected_in:?}; relay: {published} events in {relayed_in:?}; \
         peak RSS {baseline} MB before, {after_projection} MB after the projection, {peak} MB after the relay"
    );
    assert!(
        after_projection <= baseline + BOUND_MB,
        "peak RSS {after_projection} MB after replaying {PROJECTED} events (from {baseline} MB)"
    );
    assert!(
        peak <= baseline + BOUND_MB,
        "peak RSS {peak} MB after relaying {published} events (from {baseline} MB)"
    );
}
