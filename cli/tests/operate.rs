//! The operator's commands as a process, beside a projection runner that
//! holds the store's units (as a serving application would): `status` shows
//! what the runner records, `pause` stops the running projection and
//! `resume` starts it again, `dead-letters` lists what it parked and
//! `discard` drops it, `events` browses streams, correlations and
//! positions; and the mistakes a user makes most (a missing file, a stopped
//! server, a typo in a projection's name, a URL of another kind) fail at
//! once with a message that says what to do.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use outflow::async_trait;
use outflow::projection::{HandlerError, OnError, Projection, ProjectionOptions, RetryPolicy};
use outflow::runner::ProjectionRunner;
use outflow::{AppendRequest, EventStore, NewEvent, RecordedEvent, SqliteStore};
use outflow_tests::tally::{tallied, Tally};
use outflow_tests::TestDir;
use serde_json::{json, Value};

const OUTFLOW: &str = env!("CARGO_BIN_EXE_outflow");

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
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected a failure: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Counts deposits; refuses the amount 666 (parked).
struct Ledger;

#[async_trait]
impl Projection<SqliteStore> for Ledger {
    fn name(&self) -> &str {
        "ledger"
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut <SqliteStore as outflow::Transactional>::Transaction,
    ) -> Result<(), HandlerError> {
        for event in events {
            if event.payload["Deposited"]["amount"] == json!(666) {
                return Err(HandlerError::data("666 is refused"));
            }
        }
        Ok(())
    }
}

fn deposit(amount: u64, correlation: Option<uuid::Uuid>) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Deposited".into(),
        event_version: "1".into(),
        payload: json!({"Deposited": {"amount": amount}}),
        metadata: Default::default(),
        correlation_id: correlation,
        causation_id: None,
    }
}

async fn append(
    store: &SqliteStore,
    id: &str,
    version: u64,
    events: Vec<NewEvent>,
) -> RecordedEvent {
    let written = store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: id.into(),
            expected_version: version,
            events,
        })
        .await
        .expect("append");
    written.last().cloned().expect("one event at least")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pause_resume_dead_letters_discard_and_events_beside_a_running_node() {
    let dir = TestDir::new("cli_operate");
    let path = dir.file("bank.db");
    let store = SqliteStore::open(&path).await.expect("store");
    let url = format!("sqlite://{}", path.display());
    let correlation = uuid::Uuid::now_v7();
    append(
        &store,
        "a-1",
        0,
        vec![
            deposit(10, Some(correlation)),
            deposit(666, Some(correlation)),
        ],
    )
    .await;
    let last = append(&store, "a-2", 0, vec![deposit(20, None)]).await;

    let runner = ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(5))
        .projection(
            ProjectionOptions::new(Ledger)
                .retry(RetryPolicy {
                    max_attempts: 2,
                    initial_backoff: Duration::from_millis(10),
                    max_backoff: Duration::from_millis(20),
                })
                .on_error(OnError::Park),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = outflow_tests::start_runner(&runner);
    let _ = last;

    // Status: the unit, caught up, one event parked, owned by the runner.
    let unit = until_status_of(
        &dir.path,
        &url,
        "ledger",
        "caught up with one parked",
        |u| {
            u["events_behind"] == json!(0) && u["parked"] == json!(1) && u["state"] == json!("live")
        },
    )
    .await;
    assert_eq!(unit["events_behind"], json!(0), "{unit}");
    assert_eq!(unit["parked"], json!(1), "{unit}");
    assert_eq!(unit["paused"], json!(false), "{unit}");
    assert!(unit["owner"].is_string(), "{unit}");
    let table = stdout_of(&outflow(&dir.path, &["status", &url]));
    assert!(
        table.contains("ledger") && table.contains("live"),
        "{table}"
    );

    // The dead letter, as JSON lines.
    let letters = stdout_of(&outflow(
        &dir.path,
        &["dead-letters", &url, "ledger", "--json"],
    ));
    let letter: Value = serde_json::from_str(letters.trim()).expect("one JSON line");
    assert_eq!(letter["aggregate_id"], json!("a-1"));
    assert_eq!(letter["sequence"], json!(2));
    assert!(
        letter["error"]
            .as_str()
            .is_some_and(|e| e.contains("666 is refused")),
        "{letter}"
    );

    // Paused from this process: it returns once the running node paused.
    let said = stdout_of(&outflow(&dir.path, &["pause", &url, "ledger"]));
    assert!(
        said.contains("paused on the 1 unit(s) nodes hold"),
        "{said}"
    );
    let paused_at = append(&store, "a-3", 0, vec![deposit(30, None)]).await;
    let unit = unit_status(&dir.path, &url, "ledger");
    assert_eq!(unit["paused"], json!(true), "{unit}");
    assert_eq!(unit["state"], json!("paused"), "{unit}");
    // Nothing applied while paused: the event stays behind.
    tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let unit = unit_status(&dir.path, &url, "ledger");
            assert_eq!(
                unit["events_behind"],
                json!(1),
                "applied while paused: {unit}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect_err("the loop only ends by the timeout");

    // Resumed: it catches up.
    stdout_of(&outflow(&dir.path, &["resume", &url, "ledger"]));
    runner
        .wait_for(paused_at.checkpoint(), &["ledger"], Duration::from_secs(60))
        .await
        .expect("caught up after the resume");
    let unit = unit_status(&dir.path, &url, "ledger");
    assert_eq!(unit["paused"], json!(false), "{unit}");
    assert_eq!(unit["events_behind"], json!(0), "{unit}");

    // Discarded: gone from the list; a second discard says so.
    let id = letter["id"].as_u64().expect("an id").to_string();
    stdout_of(&outflow(&dir.path, &["discard", &url, &id]));
    let letters = stdout_of(&outflow(
        &dir.path,
        &["dead-letters", &url, "ledger", "--json"],
    ));
    assert!(letters.trim().is_empty(), "{letters}");
    let again = failure_of(&outflow(&dir.path, &["discard", &url, &id]));
    assert!(again.contains(&format!("no dead letter #{id}")), "{again}");

    // Events: a stream, a correlation, after a position.
    let lines = |args: &[&str]| -> Vec<Value> {
        stdout_of(&outflow(&dir.path, args))
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let stream = lines(&["events", &url, "--stream", "account/a-1", "--json"]);
    assert_eq!(stream.len(), 2);
    assert_eq!(stream[1]["payload"], json!({"Deposited": {"amount": 666}}));
    let caused = lines(&[
        "events",
        &url,
        "--correlation",
        &correlation.to_string(),
        "--json",
    ]);
    assert_eq!(caused.len(), 2);
    assert!(caused.iter().all(|e| e["aggregate_id"] == json!("a-1")));
    let after = lines(&["events", &url, "--after", "2", "--json"]);
    let positions: Vec<u64> = after
        .iter()
        .filter_map(|e| e["position"].as_u64())
        .collect();
    assert_eq!(positions, vec![3, 4]);
    let limited = lines(&["events", &url, "--limit", "1", "--json"]);
    assert_eq!(limited.len(), 1);

    // A typo in a projection's name: the names there are.
    let typo = failure_of(&outflow(&dir.path, &["pause", &url, "ledgr"]));
    assert!(
        typo.contains("no projection `ledgr`") && typo.contains("ledger"),
        "{typo}"
    );

    outflow_tests::stop_runner(shutdown, handle).await;
}

#[test]
fn the_mistakes_a_user_makes_most_fail_at_once_and_say_what_to_do() {
    let dir = TestDir::new("cli_mistakes");
    let missing = format!("sqlite://{}", dir.file("nope.db").display());
    let message = failure_of(&outflow(&dir.path, &["status", &missing]));
    assert!(message.contains("no such file"), "{message}");
    assert!(!dir.file("nope.db").exists(), "reading created the file");

    let message = failure_of(&outflow(
        &dir.path,
        &["events", "mysql://ann:secret@db/bank"],
    ));
    assert!(message.contains("not a store URL"), "{message}");
    assert!(
        !message.contains("secret"),
        "the password is shown: {message}"
    );

    // A stopped server: refused at once, the password not shown.
    let started = Instant::now();
    let message = failure_of(&outflow(
        &dir.path,
        &["status", "postgres://ann:secret@127.0.0.1:1/bank"],
    ));
    assert!(
        message.contains("connecting to postgres://ann:***@127.0.0.1:1/bank"),
        "{message}"
    );
    assert!(!message.contains("secret"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it waited {:?}",
        started.elapsed()
    );

    // Bad arguments are exit code 2, with the usage.
    let output = outflow(&dir.path, &["copy", "--from", "sqlite://a.db"]);
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_and_retry_are_asked_of_the_running_node_and_refused_without_one() {
    let dir = TestDir::new("cli_requests");
    let path = dir.file("bank.db");
    let store = SqliteStore::open(&path).await.expect("store");
    let url = format!("sqlite://{}", path.display());
    for i in 0..50u64 {
        append(&store, &format!("a-{i}"), 0, vec![deposit(i + 1, None)]).await;
    }
    append(&store, "poison", 0, vec![deposit(666, None)]).await;
    let broken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let runner = ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_millis(200))
        .lease_ttl(Duration::from_secs(5))
        .projection(
            ProjectionOptions::new(Tally {
                broken: broken.clone(),
            })
            .retry(RetryPolicy {
                max_attempts: 1,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(20),
            })
            .on_error(OnError::Park),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = outflow_tests::start_runner(&runner);
    let unit = until_status_of(
        &dir.path,
        &url,
        "tally",
        "caught up, the poison parked",
        |u| u["events_behind"] == json!(0) && u["parked"] == json!(1),
    )
    .await;
    assert!(unit["owner"].is_string(), "{unit}");
    assert_eq!(tallied(&store).await, 50);

    // Still broken: the retry is made by the node and fails again (exit 1).
    let output = outflow(&dir.path, &["retry", &url, "tally", "--all"]);
    let message = failure_of(&output);
    assert!(message.contains("failed again"), "{message}");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("failed again: 666 is refused"), "{said}");

    // Fixed: retried by the node, handled, no longer parked.
    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    let said = stdout_of(&outflow(
        &dir.path,
        &["retry", &url, "tally", "--all", "--json"],
    ));
    let result: Value = serde_json::from_str(said.trim()).expect("JSON");
    assert_eq!(
        result["handled"].as_array().map(Vec::len),
        Some(1),
        "{result}"
    );
    assert_eq!(tallied(&store).await, 51);
    let letters = stdout_of(&outflow(
        &dir.path,
        &["dead-letters", &url, "tally", "--json"],
    ));
    assert!(letters.trim().is_empty(), "{letters}");

    // Rebuilt by the node: the table reset and replayed, every event once.
    let said = stdout_of(&outflow(&dir.path, &["rebuild", &url, "tally"]));
    assert!(
        said.contains("tally: rebuilt, 51 events replayed"),
        "{said}"
    );
    assert_eq!(tallied(&store).await, 51);
    let unit = unit_status(&dir.path, &url, "tally");
    assert_eq!(unit["rebuild_total"], json!(51), "{unit}");

    // The read model emptied by hand, then the projection reset to the
    // start (no hook runs): the running node takes the units up from there
    // and fills it again.
    outflow::sqlx::query("DELETE FROM tally")
        .execute(store.writer())
        .await
        .expect("empty the tally");
    let said = stdout_of(&outflow(
        &dir.path,
        &["reset", &url, "tally", "--to", "start", "--json"],
    ));
    let reset: Value = serde_json::from_str(said.trim()).expect("JSON");
    assert_eq!(reset["events"], json!(51), "{reset}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while tallied(&store).await < 51 {
        assert!(Instant::now() < deadline, "the reset was not taken up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_status_of(&dir.path, &url, "tally", "caught up after the reset", |u| {
        u["events_behind"] == json!(0)
    })
    .await;
    assert_eq!(tallied(&store).await, 51);
    let message = failure_of(&outflow(
        &dir.path,
        &["reset", &url, "tally", "--to", "soon"],
    ));
    assert!(message.contains("TRANSACTION.POSITION"), "{message}");
    let message = failure_of(&outflow(
        &dir.path,
        &["reset", &url, "tally", "--to", "999999.999999"],
    ));
    assert!(message.contains("past the log's head"), "{message}");

    // No node: refused at once, nothing asked.
    outflow_tests::stop_runner(shutdown, handle).await;
    let message = failure_of(&outflow(&dir.path, &["rebuild", &url, "tally"]));
    assert!(message.contains("no node is running `tally`"), "{message}");
    let message = failure_of(&outflow(&dir.path, &["retry", &url, "tally", "7"]));
    assert!(message.contains("no dead letter #7"), "{message}");
}

/// `outflow status --json`'s unit of `projection`.
fn unit_status(dir: &Path, url: &str, projection: &str) -> Value {
    let status: Value =
        serde_json::from_str(&stdout_of(&outflow(dir, &["status", url, "--json"]))).expect("JSON");
    status["units"]
        .as_array()
        .and_then(|units| {
            units
                .iter()
                .find(|u| u["projection"] == json!(projection))
                .cloned()
        })
        .unwrap_or(Value::Null)
}

/// Polls `outflow status` until `projection`'s unit satisfies `probe`.
async fn until_status_of(
    dir: &Path,
    url: &str,
    projection: &str,
    what: &str,
    probe: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let unit = unit_status(dir, url, projection);
        if probe(&unit) {
            return unit;
        }
        assert!(Instant::now() < deadline, "never: {what}; last {unit}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
