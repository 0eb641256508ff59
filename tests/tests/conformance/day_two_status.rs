//! Status that is current and true, and waits that say what is wrong: an
//! error left by a process that is gone is not reported as current after a
//! fix and a restart; a wait on a projection no node runs says so; a typo
//! in a projection's name is answered at once; a
//! unit busy with a slow batch while events wait is not `live`; the status
//! shows each unit's epoch.

use outflow_tests as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outflow::projection::{HandlerError, Projection, ProjectionOptions, RetryPolicy};
use outflow::runner::{ProjectionRunner, WaitError};
use outflow::store::memory::MemoryTransaction;
use outflow::store::projections::ProjectionState;
use outflow::{AppendRequest, EventLog, EventStore, MemoryStore, RecordedEvent};

/// Fails with an infrastructure error (as a missing table would) while
/// `broken` is set; `slow` makes each batch's effects wait until cleared.
struct Fragile {
    broken: Arc<AtomicBool>,
    slow: Arc<AtomicBool>,
}

#[async_trait]
impl Projection<MemoryStore> for Fragile {
    fn name(&self) -> &str {
        "fragile"
    }

    async fn effects(&self, _events: &[RecordedEvent]) -> Result<(), HandlerError> {
        while self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _events: &[RecordedEvent],
        _tx: &mut MemoryTransaction,
    ) -> Result<(), HandlerError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::infrastructure(
                "relation \"fragile_rows\" does not exist",
            ));
        }
        Ok(())
    }
}

fn runner(
    store: &MemoryStore,
    broken: &Arc<AtomicBool>,
    slow: &Arc<AtomicBool>,
) -> ProjectionRunner<MemoryStore> {
    ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(100))
        .lease_ttl(Duration::from_secs(30))
        .projection(
            ProjectionOptions::new(Fragile {
                broken: broken.clone(),
                slow: slow.clone(),
            })
            .retry(RetryPolicy {
                max_attempts: u32::MAX,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(100),
            }),
        )
        .build()
        .expect("the runner")
}

async fn append(store: &MemoryStore, version: u64) {
    store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "a".into(),
            expected_version: version,
            events: vec![common::deposit_event(1)],
        })
        .await
        .expect("append");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_of_a_stopped_process_is_not_current_after_a_fix() {
    let store = MemoryStore::new();
    let broken = Arc::new(AtomicBool::new(true));
    let slow = Arc::new(AtomicBool::new(false));
    let first = runner(&store, &broken, &slow);
    let (stop, handle) = common::start_runner(&first);
    append(&store, 0).await;
    let head = store.head().await.expect("head");
    let failing = first
        .wait_for(head, &["fragile"], Duration::from_secs(30))
        .await;
    assert!(
        matches!(failing, Err(WaitError::Failing { .. })),
        "{failing:?}"
    );
    common::stop_runner(stop, handle).await;

    // Fixed, and a new process: its waits do not answer the old error.
    broken.store(false, Ordering::SeqCst);
    let second = runner(&store, &broken, &slow);
    let (stop, handle) = common::start_runner(&second);
    second
        .wait_for(head, &["fragile"], Duration::from_secs(30))
        .await
        .expect("the fix is seen, not the old error");
    let status = second.status().await.expect("status");
    assert_eq!(status[0].last_error, None, "{status:?}");
    assert!(status[0].epoch >= 2, "a new owner, a new epoch: {status:?}");
    common::stop_runner(stop, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_on_a_projection_no_node_runs_says_so() {
    let store = MemoryStore::new();
    let flag = Arc::new(AtomicBool::new(false));
    let never_run = runner(&store, &flag, &flag);
    append(&store, 0).await;
    let head = store.head().await.expect("head");
    let waited = never_run
        .wait_for(head, &["fragile"], Duration::from_secs(60))
        .await;
    match waited {
        Err(error @ WaitError::NotRunning { .. }) => {
            assert!(
                error.to_string().contains("no live node runs it"),
                "{error}"
            );
        }
        other => panic!("not NotRunning: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_a_name_is_answered_at_once() {
    let store = MemoryStore::new();
    let flag = Arc::new(AtomicBool::new(false));
    let runner = runner(&store, &flag, &flag);
    append(&store, 0).await;
    let head = store.head().await.expect("head");
    let asked = tokio::time::Instant::now();
    match runner
        .wait_for(head, &["fargile"], Duration::from_secs(60))
        .await
    {
        Err(WaitError::UnknownProjection(projection)) => assert_eq!(projection, "fargile"),
        other => panic!("not UnknownProjection: {other:?}"),
    }
    // Answered without the 3 s grace a starting runner gets.
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_unit_with_events_waiting_is_not_live() {
    let store = MemoryStore::new();
    let broken = Arc::new(AtomicBool::new(false));
    let slow = Arc::new(AtomicBool::new(false));
    let runner = runner(&store, &broken, &slow);
    let (stop, handle) = common::start_runner(&runner);
    append(&store, 0).await;
    let head = store.head().await.expect("head");
    runner
        .wait_for(head, &["fragile"], Duration::from_secs(30))
        .await
        .expect("caught up");
    assert_eq!(
        runner.status().await.expect("status")[0].state,
        ProjectionState::Live
    );
    // The next batch's effects hang while more events arrive.
    slow.store(true, Ordering::SeqCst);
    append(&store, 1).await;
    append(&store, 2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = runner.status().await.expect("status");
        if status[0].lag_events >= 2 {
            assert_eq!(status[0].state, ProjectionState::CatchingUp, "{status:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slow.store(false, Ordering::SeqCst);
    let head = store.head().await.expect("head");
    runner
        .wait_for(head, &["fragile"], Duration::from_secs(30))
        .await
        .expect("caught up again");
    assert_eq!(
        runner.status().await.expect("status")[0].state,
        ProjectionState::Live
    );
    common::stop_runner(stop, handle).await;
}

/// `wait_for` takes what a command returns: `Committed::checkpoint()` is an
/// `Option` — `Some` waits for it, `None` (nothing written) returns at once,
/// even on a runner that was never started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_takes_a_commands_optional_checkpoint() {
    let store = MemoryStore::new();
    let flag = Arc::new(AtomicBool::new(false));
    let idle = runner(&store, &flag, &flag);
    idle.wait_for(None, &["fragile"], Duration::from_secs(60))
        .await
        .expect("nothing to wait for");
    let running = runner(&store, &flag, &flag);
    let (stop, task) = common::start_runner(&running);
    append(&store, 0).await;
    let head = Some(store.head().await.expect("head"));
    running
        .wait_for(head, &["fragile"], Duration::from_secs(30))
        .await
        .expect("waited for Some(checkpoint)");
    outflow::runner::wait_for(&store, head, &["fragile"], Duration::from_secs(30))
        .await
        .expect("the free function takes it too");
    common::stop_runner(stop, task).await;
}
