//! Resetting a projection to a checkpoint, its read model kept: the events
//! after the checkpoint are handled again (a step back), or never (a step
//! forward); the status shows the replay's progress; a checkpoint past the
//! head and an unknown projection are refused with typed errors; the console
//! answers the same through `POST …/reset?to=`. On PostgreSQL, SQLite and
//! the in-memory store.

use super::*;

use outflow::store::projections::ProjectionStore;

/// Records the position of every event it handles, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<u64>>>);

impl Seen {
    fn positions(&self) -> Vec<u64> {
        self.0.lock().expect("seen").clone()
    }
}

#[async_trait]
impl<S: ProjectionStore> Projection<S> for Seen {
    fn name(&self) -> &str {
        "seen"
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        self.0
            .lock()
            .expect("seen")
            .extend(events.iter().map(|e| e.position));
        Ok(())
    }
}

async fn until_seen(seen: &Seen, count: usize) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let positions = seen.positions();
        if positions.len() >= count {
            return positions;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} events handled: {positions:?}",
            positions.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn append_ten<S: EventStore>(store: &S, prefix: &str) -> Vec<RecordedEvent> {
    let mut written = Vec::new();
    for i in 0..10 {
        written.extend(
            store
                .append(AppendRequest {
                    aggregate_type: "account".into(),
                    aggregate_id: format!("{prefix}-{i}"),
                    expected_version: 0,
                    events: vec![common::deposit_event(i + 1)],
                })
                .await
                .expect("append"),
        );
    }
    written
}

async fn resets<S: outflow::Backend>(store: S) {
    let written = append_ten(&store, "r").await;
    let seen = Seen::default();
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(seen.clone()))
        .build()
        .expect("runner");
    let (shutdown, running) = common::start_runner(&runner);
    let all: Vec<u64> = written.iter().map(|e| e.position).collect();
    assert_eq!(until_seen(&seen, 10).await, all);

    // A step back: the six events after the fourth are handled again.
    let left = runner
        .reset_to("seen", written[3].checkpoint())
        .await
        .expect("reset");
    assert_eq!(left, 6);
    let again = until_seen(&seen, 16).await;
    assert_eq!(
        &again[10..],
        &all[4..],
        "the events after the checkpoint, again"
    );
    // Its status counts the replay (a rebuild's progress while it runs).
    let status =
        common::wait_for_status(&runner, "seen", |s| s.processed == 6 && s.lag_events == 0).await;
    assert!(status.rebuild.is_none_or(|r| r.is_complete()), "{status:?}");
    assert!(status.epoch >= 2, "a new epoch: {status:?}");

    // A step forward, past events not handled yet: they are skipped.
    common::stop_runner(shutdown, running).await;
    let skipped = append_ten(&store, "s").await;
    let left = runner
        .reset_to("seen", skipped[7].checkpoint())
        .await
        .expect("reset forward");
    assert_eq!(left, 2);
    let (shutdown, running) = common::start_runner(&runner);
    let after = until_seen(&seen, 18).await;
    assert_eq!(
        &after[16..],
        &[skipped[8].position, skipped[9].position],
        "only the events after the checkpoint"
    );

    // Refused: past the head, an unknown projection.
    let head = store.committed_head().await.expect("head");
    let past = Checkpoint::new(head.transaction_id + 1, head.position + 1);
    match runner.reset_to("seen", past).await {
        Err(outflow::StoreError::Config(outflow::error::ConfigError::Invalid {
            reason, ..
        })) => {
            assert!(reason.contains("past the log's head"), "{reason}")
        }
        other => panic!("a checkpoint past the head: {other:?}"),
    }
    assert!(matches!(
        runner.reset_to("nope", Checkpoint::START).await,
        Err(outflow::StoreError::Config(
            outflow::error::ConfigError::UnknownProjection(_)
        ))
    ));

    // The console: the same, over HTTP.
    let console = outflow::admin::Admin::new(runner.clone())
        .operator_token("op")
        .router();
    let base = common::serve_console(console).await;
    let http = reqwest::Client::new();
    let post = |query: String| {
        let request = http
            .post(format!("{base}/api/projections/seen/reset{query}"))
            .bearer_auth("op");
        async move {
            let response = request.send().await.expect("POST reset");
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (status, body)
        }
    };
    assert_eq!(post(String::new()).await.0, 400, "no `to`");
    assert_eq!(post("?to=abc".into()).await.0, 400, "a malformed `to`");
    let (status, body) = post(format!("?to={}.{}", past.transaction_id, past.position)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("invalid")),
        "{body}"
    );
    let (status, body) = post("?to=0.0".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], serde_json::json!(20), "{body}");
    let replayed = until_seen(&seen, 38).await;
    let everything: Vec<u64> = written
        .iter()
        .chain(skipped.iter())
        .map(|e| e.position)
        .collect();
    assert_eq!(
        &replayed[18..],
        everything.as_slice(),
        "from the start, every event"
    );
    common::stop_runner(shutdown, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_a_checkpoint_on_postgres() {
    let db = common::TestDb::new("reset_to").await;
    resets(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_a_checkpoint_on_sqlite() {
    let dir = common::TestDir::new("reset_to");
    resets(dir.sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_a_checkpoint_in_memory() {
    resets(MemoryStore::new()).await;
}
