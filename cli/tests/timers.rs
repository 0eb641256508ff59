//! `outflow timers` beside a store with timers: the counts and the timers
//! in a state, as text and JSON; a refused timer retried and a pending one
//! cancelled from the shell; and the mistakes (an unknown state, a key that
//! is not there) failing with a message.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use outflow::timer::{Timer, TimerState, Timers};
use outflow::{CancellationToken, CommandBus, SqliteStore};
use outflow_tests::TestDir;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const OUTFLOW: &str = env!("CARGO_BIN_EXE_outflow");

/// A gate that refuses everyone.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Gate;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
enum GateEvent {
    Passed,
}

impl DomainEvent for GateEvent {
    fn event_type(&self) -> String {
        "Passed".to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the gate is shut")]
struct Shut;

impl Aggregate for Gate {
    const TYPE: &'static str = "gate";
    type Command = String;
    type Event = GateEvent;
    type Error = Shut;
    type Services = ();

    async fn handle(&mut self, _: String, _: &(), _: &EventSink<Self>) -> Result<(), Shut> {
        Err(Shut)
    }

    fn apply(&mut self, _: GateEvent) {}
}

fn outflow(dir: &Path, args: &[&str]) -> Output {
    Command::new(OUTFLOW)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run outflow")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "outflow failed ({:?}): {}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn failure_of(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "expected a failure");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn gate(key: &str) -> Timer {
    Timer::command::<Gate>(key, "g-1", &"let me in".to_owned()).expect("serialize")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_from_the_shell() {
    let dir = TestDir::new("cli_timers");
    let path = dir.file("gate.db");
    let url = format!("sqlite://{}", path.display());
    let store = SqliteStore::open(&path).await.expect("open");
    let timers = Timers::new(&store).await.expect("timers");
    timers
        .schedule_alone(gate("later").after(Duration::from_secs(3600)))
        .await
        .expect("schedule");
    timers.schedule_alone(gate("now")).await.expect("schedule");
    let bus = Arc::new(CommandBus::<Gate, _>::new(store.clone(), ()));
    let scheduler = timers
        .scheduler()
        .command(bus)
        .node_id("gatekeeper")
        .poll_interval(Duration::from_millis(100))
        .build()
        .expect("scheduler");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { scheduler.run(shutdown).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while timers.get("now").await.expect("get").map(|t| t.state) != Some(TimerState::Refused) {
        assert!(Instant::now() < deadline, "the timer was not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.expect("task").expect("ran");

    // The counts and the pending ones, as text and JSON.
    let text = stdout_of(&outflow(&dir.path, &["timers", &url]));
    assert!(text.contains("1 pending"), "{text}");
    assert!(text.contains("1 refused"), "{text}");
    assert!(text.contains("later"), "{text}");
    let json: Value = serde_json::from_str(&stdout_of(&outflow(
        &dir.path,
        &["timers", &url, "--state", "refused", "--json"],
    )))
    .expect("JSON");
    assert_eq!(json["counts"]["refused"], 1, "{json}");
    assert_eq!(json["timers"][0]["key"], "now", "{json}");
    assert_eq!(
        json["timers"][0]["last_error"], "the gate is shut",
        "{json}"
    );

    // Retry the refused one, cancel the pending one.
    stdout_of(&outflow(&dir.path, &["timers", &url, "--retry", "now"]));
    assert_eq!(
        timers.get("now").await.expect("get").map(|t| t.state),
        Some(TimerState::Pending)
    );
    stdout_of(&outflow(&dir.path, &["timers", &url, "--cancel", "later"]));
    assert_eq!(
        timers.get("later").await.expect("get").map(|t| t.state),
        Some(TimerState::Cancelled)
    );

    // Mistakes fail with a message.
    let error = failure_of(&outflow(&dir.path, &["timers", &url, "--cancel", "later"]));
    assert!(error.contains("no pending timer"), "{error}");
    let error = failure_of(&outflow(&dir.path, &["timers", &url, "--retry", "nope"]));
    assert!(error.contains("no refused or failed timer"), "{error}");
    let error = failure_of(&outflow(&dir.path, &["timers", &url, "--state", "late"]));
    assert!(error.contains("--state is pending"), "{error}");
    store.close().await;
}
