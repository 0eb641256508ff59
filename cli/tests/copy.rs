//! `outflow copy` as a process, against real SQLite files, a real
//! PostgreSQL and a real JetStream server: SIGKILLed mid-copy and run again,
//! its state file rewound (a kill between the target's commit and the state
//! write), run again without a state file, refused when the target holds
//! other events, following a live source until SIGTERM, and through a
//! partitioned JetStream store and back. Each time the target's log must
//! equal the source's: the same events, ids, times and metadata, each
//! stream's sequences, and (into a log of one total order) the same order.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use outflow::store::jetstream::JetStreamStore;
use outflow::{
    AppendRequest, Checkpoint, EventLog, EventStore, LogFilter, NewEvent, PostgresStore,
    RecordedEvent, SqliteStore,
};
use outflow_tests::{TestDb, TestDir};
use serde_json::{json, Value};

const OUTFLOW: &str = env!("CARGO_BIN_EXE_outflow");

/// The URL of a test database.
fn db_url(db: &TestDb) -> String {
    let server = outflow_tests::server_url();
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base.to_owned(), format!("?{query}")),
        None => (server.clone(), String::new()),
    };
    let root = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(root, _)| root);
    format!("{root}/{}{query}", db.name)
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Runs `outflow ARGS` in `dir` to its end.
fn outflow(dir: &Path, args: &[&str]) -> Output {
    Command::new(OUTFLOW)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run outflow")
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(OUTFLOW)
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start outflow")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The JSON report a `--json` copy printed.
fn report(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "outflow failed ({:?}): {}{}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

/// `streams` streams written by appends of 1 to 4 events, some with
/// metadata and a correlation, until the log holds at least `events`.
async fn fill<S: EventStore>(store: &S, streams: usize, events: usize) -> usize {
    fill_named(store, "s", streams, events).await
}

/// [`fill`] into streams `<name>-<n>`.
async fn fill_named<S: EventStore>(store: &S, name: &str, streams: usize, events: usize) -> usize {
    let mut versions = vec![0u64; streams];
    let mut written = 0;
    let mut round = 0u64;
    while written < events {
        for (s, version) in versions.iter_mut().enumerate() {
            let count = 1 + (s + round as usize) % 4;
            let correlation = uuid::Uuid::now_v7();
            let events = (0..count)
                .map(|i| {
                    let mut metadata = HashMap::new();
                    if i % 2 == 0 {
                        metadata.insert("user".to_owned(), format!("u-{s}"));
                    }
                    NewEvent {
                        event_id: uuid::Uuid::now_v7(),
                        event_type: if i == 0 { "Opened" } else { "Deposited" }.into(),
                        event_version: "1".into(),
                        payload: json!({"Deposited": {"amount": round * 10 + i as u64, "note": "x"}}),
                        metadata,
                        correlation_id: (s % 3 == 0).then_some(correlation),
                        causation_id: None,
                    }
                })
                .collect();
            store
                .append(AppendRequest {
                    aggregate_type: if s % 2 == 0 { "account" } else { "user" }.into(),
                    aggregate_id: format!("{name}-{s}"),
                    expected_version: *version,
                    events,
                })
                .await
                .expect("append to the source");
            *version += count as u64;
            written += count;
        }
        round += 1;
    }
    written
}

/// A whole log (each partition in turn for a partitioned one).
///
/// On PostgreSQL a reader sees an event only once no transaction that began
/// before its commit is still open, anywhere on the server (other tests run
/// beside this one): an unpartitioned log is read up to the head committed
/// when the call began, waiting for readers to be let through.
async fn whole<L: EventLog>(log: &L) -> Vec<RecordedEvent> {
    let parts = log.partitions().max(1);
    if parts == 1 {
        let committed = log.committed_head().await.expect("the committed head");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut all = Vec::new();
        let mut after = Checkpoint::START;
        while after < committed {
            let events = log
                .read_log(after, &LogFilter::all(), 1_000)
                .await
                .expect("read the log");
            match events.last() {
                Some(last) => {
                    after = last.checkpoint();
                    all.extend(events);
                }
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "the log's readers never reached {committed:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        return all;
    }
    let mut all = Vec::new();
    for p in 0..parts {
        let filter = if parts == 1 {
            LogFilter::all()
        } else {
            LogFilter::all().with_partition(p, parts)
        };
        let mut after = Checkpoint::START;
        loop {
            let events = log
                .read_log(after, &filter, 1_000)
                .await
                .expect("read the log");
            let Some(last) = events.last() else { break };
            after = last.checkpoint();
            all.extend(events);
        }
    }
    all
}

/// What must survive a copy: everything but where the target put it.
fn content(e: &RecordedEvent) -> Value {
    json!([
        e.event_id,
        e.aggregate_type,
        e.aggregate_id,
        e.sequence,
        e.event_type,
        e.event_version,
        e.payload,
        e.metadata,
        e.correlation_id,
        e.causation_id,
        e.recorded_at.timestamp_micros(),
    ])
}

/// The target holds exactly the source's events, each stream's in order;
/// with `same_order`, in the source's log order too.
async fn assert_same_log<A: EventLog, B: EventLog>(source: &A, target: &B, same_order: bool) {
    let from = whole(source).await;
    let to = whole(target).await;
    assert_eq!(from.len(), to.len(), "as many events");
    if same_order {
        let a: Vec<Value> = from.iter().map(content).collect();
        let b: Vec<Value> = to.iter().map(content).collect();
        assert!(a == b, "the target's log differs from the source's");
    } else {
        let mut a: Vec<String> = from.iter().map(|e| content(e).to_string()).collect();
        let mut b: Vec<String> = to.iter().map(|e| content(e).to_string()).collect();
        a.sort();
        b.sort();
        assert!(a == b, "the target holds other events than the source");
    }
    // Each stream's events in sequence order, in the target's log.
    let mut last: HashMap<(String, String), u64> = HashMap::new();
    for e in &to {
        let seen = last
            .entry((e.aggregate_type.clone(), e.aggregate_id.clone()))
            .or_insert(0);
        assert_eq!(e.sequence, *seen + 1, "stream order in the target");
        *seen = e.sequence;
    }
}

fn state_copied(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("copied").and_then(Value::as_u64))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_three_times_then_rewound_then_rerun_copies_each_event_once() {
    let dir = TestDir::new("copy_kills");
    let source_path = dir.file("source.db");
    let source = SqliteStore::open(&source_path).await.expect("source");
    let total = fill(&source, 30, 4_000).await;
    let db = TestDb::new("copy_kills").await;
    let (from, to) = (sqlite_url(&source_path), db_url(&db));
    let state = dir.file("copy.json");
    let state_arg = state.display().to_string();
    let args = [
        "copy", "--from", &from, "--to", &to, "--batch", "7", "--state", &state_arg, "--json",
    ];

    // Killed three times while it copies: each run resumes where the state
    // file says.
    let mut snapshots = Vec::new();
    for round in 1..=3u64 {
        let before = state_copied(&state);
        let mut child = spawn(&dir.path, &args);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                child.try_wait().expect("poll the copy").is_none(),
                "the copy ended before it was killed (round {round})"
            );
            if state_copied(&state) >= before + 400 {
                break;
            }
            assert!(Instant::now() < deadline, "no progress in round {round}");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().expect("SIGKILL the copy");
        child.wait().expect("reap the copy");
        snapshots.push(std::fs::read(&state).expect("the state file"));
    }

    let finished = report(&outflow(&dir.path, &args));
    assert_eq!(finished["resumed"], json!(true));
    assert_eq!(finished["source"], finished["target"]);
    assert_eq!(finished["source"]["events"], json!(total));
    let target = db.store().await;
    assert_same_log(&source, &target, true).await;

    // The state write lost after the target committed: the state rewound to
    // the first kill's. The events after it are found, not written again.
    std::fs::write(&state, &snapshots[0]).expect("rewind the state");
    let rewound = report(&outflow(&dir.path, &args));
    assert_eq!(rewound["copied"], json!(0), "{rewound}");
    assert!(
        rewound["already_there"].as_u64().unwrap_or(0) > 0,
        "{rewound}"
    );
    assert_eq!(rewound["source"], rewound["target"]);

    // No state at all: the whole log is found in the target.
    std::fs::remove_file(&state).expect("remove the state");
    let again = report(&outflow(&dir.path, &args));
    assert_eq!(again["copied"], json!(0));
    assert_eq!(again["already_there"], json!(total));
    assert_same_log(&source, &target, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_holding_other_events_is_refused_with_exit_code_3() {
    let dir = TestDir::new("copy_diverged");
    let source_path = dir.file("source.db");
    let source = SqliteStore::open(&source_path).await.expect("source");
    fill(&source, 4, 20).await;
    let db = TestDb::new("copy_diverged").await;
    let target = db.store().await;
    // Another event where the source's first account event belongs.
    fill(&target, 1, 1).await;
    let output = outflow(
        &dir.path,
        &[
            "copy",
            "--from",
            &sqlite_url(&source_path),
            "--to",
            &db_url(&db),
        ],
    );
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    let message = text(&output.stderr);
    assert!(
        message.contains("account `s-0` differs from the source's at sequence 1"),
        "{message}"
    );
    assert_eq!(whole(&target).await.len(), 1, "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_copy_takes_live_appends_and_verifies_on_sigterm() {
    let dir = TestDir::new("copy_follow");
    let db = TestDb::new("copy_follow_source").await;
    let source = db.store().await;
    fill(&source, 10, 200).await;
    let target_path = dir.file("target.db");
    let mut child = spawn(
        &dir.path,
        &[
            "copy",
            "--from",
            &db_url(&db),
            "--to",
            &sqlite_url(&target_path),
            "--follow",
            "--json",
        ],
    );
    let target = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if target_path.exists() {
                if let Ok(store) = SqliteStore::builder(&target_path)
                    .migrate(false)
                    .build()
                    .await
                {
                    if whole(&store).await.len() >= 200 {
                        break store;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the first 200 events never arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Appends while it follows (more streams, so the versions are new).
    for round in 0..5 {
        fill_named(&source, &format!("live{round}"), 2, 10).await;
    }
    let expected = whole(&source).await.len();
    let deadline = Instant::now() + Duration::from_secs(120);
    while whole(&target).await.len() < expected {
        assert!(Instant::now() < deadline, "live appends never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGTERM: it stops following, verifies and reports.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let output = wait_output(&mut child, Duration::from_secs(60));
    let finished = report(&output);
    assert_eq!(finished["source"]["events"], json!(expected));
    assert_eq!(finished["source"], finished["target"]);
    assert_same_log(&source, &target, true).await;
}

/// Waits for a child to end and collects its output.
fn wait_output(child: &mut Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    while child.try_wait().expect("poll").is_none() {
        assert!(Instant::now() < deadline, "the process did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    use std::io::Read;
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_end(&mut stderr);
    }
    Output {
        status: child.wait().expect("status"),
        stdout,
        stderr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_a_partitioned_jetstream_store_and_back() {
    let dir = TestDir::new("copy_jetstream");
    let db = TestDb::new("copy_js_source").await;
    let source = db.store().await;
    let total = fill(&source, 12, 600).await;
    let prefix = format!("cp{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let nats = outflow_tests::nats_url();
    let options = ["--nats-prefix", prefix.as_str(), "--nats-partitions", "3"];
    let mut args = vec!["copy", "--from", "", "--to", &nats, "--json"];
    let from = db_url(&db);
    args[2] = &from;
    args.extend(options);
    let there = report(&outflow(&dir.path, &args));
    assert_eq!(there["copied"], json!(total));
    assert_eq!(there["source"], there["target"]);

    let client = async_nats::connect(nats.as_str()).await.expect("connect");
    let jetstream = JetStreamStore::builder(client)
        .prefix(prefix.clone())
        .partitions(3)
        .build()
        .await
        .expect("the JetStream store");
    assert_same_log(&source, &jetstream, false).await;

    let back = TestDb::new("copy_js_back").await;
    let back_url = db_url(&back);
    let mut args = vec!["copy", "--from", &nats, "--to", &back_url, "--json"];
    args.extend(options);
    let returned = report(&outflow(&dir.path, &args));
    assert_eq!(returned["copied"], json!(total));
    assert_eq!(returned["source"], there["source"], "the same checksum");
    let back_store: PostgresStore = back.store().await;
    assert_same_log(&jetstream, &back_store, false).await;
    // Run again: nothing to copy, still verified.
    let again = report(&outflow(&dir.path, &args));
    assert_eq!(again["copied"], json!(0));
    assert_eq!(again["source"], again["target"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_target_server_stops_fails_saying_so_and_resumes_once_it_is_back() {
    let dir = TestDir::new("copy_target_stops");
    let source_path = dir.file("source.db");
    let source = SqliteStore::open(&source_path).await.expect("source");
    let total = fill(&source, 20, 3_000).await;
    let server = outflow_tests::own_postgres::OwnPostgres::start_new();
    let target = outflow_tests::own_postgres::connect(&server.url()).await;
    let (from, to) = (sqlite_url(&source_path), server.url());
    let state = dir.file("copy.json");
    let state_arg = state.display().to_string();
    let args = [
        "copy", "--from", &from, "--to", &to, "--batch", "7", "--state", &state_arg, "--json",
    ];

    // The copy makes progress, then waits behind a lock on the target's
    // events table (held on purpose): it cannot finish before the server
    // stops under it.
    let mut child = spawn(&dir.path, &args);
    let deadline = Instant::now() + Duration::from_secs(120);
    while state_copied(&state) < 100 {
        assert!(
            child.try_wait().expect("poll the copy").is_none(),
            "the copy ended before the server stopped"
        );
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut lock = target.pool().begin().await.expect("a transaction");
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock the events table");
    assert!(
        child.try_wait().expect("poll the copy").is_none(),
        "the copy ended before the server stopped"
    );
    let copied_before = state_copied(&state);
    server.pg_ctl("stop");
    drop(lock);
    target.pool().close().await;

    let output = wait_output(&mut child, Duration::from_secs(120));
    assert_eq!(
        output.status.code(),
        Some(1),
        "a copy whose target stopped fails with exit code 1: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    let said = text(&output.stderr).to_lowercase();
    assert!(
        said.contains("target") || said.contains("postgres") || said.contains("connect"),
        "the error says what failed: {said}"
    );
    assert!(
        state_copied(&state) >= copied_before,
        "the state never goes back"
    );

    // The server is back: the same command resumes and verifies.
    server.pg_ctl("start");
    let finished = report(&outflow(&dir.path, &args));
    assert_eq!(finished["resumed"], json!(true), "{finished}");
    assert_eq!(finished["source"], finished["target"], "{finished}");
    assert_eq!(finished["source"]["events"], json!(total));
    let target = outflow_tests::own_postgres::connect(&server.url()).await;
    assert_same_log(&source, &target, true).await;
}
