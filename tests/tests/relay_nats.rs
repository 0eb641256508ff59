//! The JetStream relay and consumer against a real PostgreSQL and a real
//! nats-server: every event reaches the stream exactly once and is applied
//! once by a consumer across two SIGKILLs of the server; headers and subjects
//! are as documented; a poison message is parked after N deliveries.
//!
//! Needs `NATS_URL` and `OUTFLOW_NATS_BIN` (scripts/test.sh sets both); a
//! missing one fails the test.

use outflow_tests as common;

use common::nats::{jetstream, msg_id, read_stream};

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use outflow::projection::{HandlerError, OnError, ProjectionOptions, RetryPolicy};
use outflow::relay::{
    ensure_stream, headers, subject_token, JetStreamConsumer, JetStreamRelay, MessageHandler,
    PostgresDeadMessages, ReceivedMessage,
};
use outflow::runner::ProjectionRunner;
use outflow::store::ProjectionState;
use outflow::{AppendRequest, Checkpoint, EventStore, NewEvent, PostgresStore, RecordedEvent};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn nats_url() -> String {
    std::env::var("NATS_URL")
        .expect("NATS_URL is not set: run the tests with scripts/test.sh, which starts nats-server")
}

fn nats_bin() -> String {
    std::env::var("OUTFLOW_NATS_BIN").expect(
        "OUTFLOW_NATS_BIN is not set: run the tests with scripts/test.sh, which finds nats-server",
    )
}

/// A nats-server of the test's own, on a fixed port and storage directory,
/// so it can be killed and started again as the same server.
struct OwnNats {
    bin: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl OwnNats {
    fn start_new() -> OwnNats {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("outflow-relay-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("storage dir");
        let mut server = OwnNats {
            bin: nats_bin(),
            port,
            dir,
            child: None,
            starts: 0,
        };
        server.start();
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("server-{}.log", self.starts)))
            .expect("log file");
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.dir.join("store"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not accept connections within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, by the child's PID.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL nats-server");
            child.wait().expect("reap nats-server");
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_consumer(
    consumer: JetStreamConsumer<PostgresStore>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });
    (shutdown, handle)
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
    }
}

fn event(event_type: &str, payload: serde_json::Value) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.to_owned(),
        event_version: "1".to_owned(),
        payload,
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    }
}

/// Applies each relayed event to `relay_effects`; a second application of the
/// same event would raise its counter.
struct ApplyOnce {
    table: &'static str,
}

#[async_trait::async_trait]
impl MessageHandler<PostgresStore> for ApplyOnce {
    async fn handle(
        &self,
        message: &ReceivedMessage,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        if message.payload == b"poison" {
            return Err(HandlerError::msg("poisoned payload"));
        }
        sqlx::query(&format!(
            "INSERT INTO {} (message_id, applied) VALUES ($1, 1)
             ON CONFLICT (message_id) DO UPDATE SET applied = {}.applied + 1",
            self.table, self.table
        ))
        .bind(&message.message_id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

async fn create_effects(pool: &PgPool, table: &str) {
    sqlx::query(&format!(
        "CREATE TABLE {table} (message_id text PRIMARY KEY, applied integer NOT NULL)"
    ))
    .execute(pool)
    .await
    .expect("effects table");
}

async fn count(pool: &PgPool, sql: &str, bind: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count")
}

const AGGREGATES: usize = 100;
const PER_AGGREGATE: usize = 100;
const PER_APPEND: usize = 10;
const TOTAL: usize = AGGREGATES * PER_AGGREGATE;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_publishes_10k_events_exactly_once_across_two_server_kills() {
    let started = Instant::now();
    let db = common::TestDb::new("relay_kill").await;
    let store = db.store().await;
    create_effects(store.pool(), "relay_effects").await;
    let mut nats = OwnNats::start_new();
    let relay_js = jetstream(&nats.url()).await;
    let consumer_js = jetstream(&nats.url()).await;
    ensure_stream(
        &relay_js,
        "RELAY_KILL",
        vec!["kill.>".into()],
        Duration::from_secs(600),
    )
    .await
    .expect("stream");

    let relay = JetStreamRelay::builder(relay_js.clone(), "relay")
        .subject_prefix("kill")
        .ack_timeout(Duration::from_secs(1))
        .build()
        .expect("relay");
    let runner = ProjectionRunner::builder(store.clone())
        .projection(
            ProjectionOptions::new(relay)
                .batch_size(500)
                .retry(fast_retries())
                .on_error(OnError::Stop),
        )
        .build()
        .expect("runner");
    let (runner_stop, runner_task) = common::start_runner(&runner);
    let consumer = JetStreamConsumer::builder(
        consumer_js,
        "RELAY_KILL",
        "effects",
        store.clone(),
        ApplyOnce {
            table: "relay_effects",
        },
    )
    .dead_letters(PostgresDeadMessages::default())
    .ack_wait(Duration::from_secs(2))
    .batch_size(200)
    .pull_expires(Duration::from_secs(2))
    .retry_backoff(Duration::from_millis(50), Duration::from_millis(500))
    .build()
    .expect("consumer");
    let (consumer_stop, consumer_task) = spawn_consumer(consumer);

    // Four writers append 10 events per command, paced so that the writes
    // span both outages.
    let written = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let store = store.clone();
        let written = written.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut last = Checkpoint::START;
            for round in 0..PER_AGGREGATE / PER_APPEND {
                for aggregate in (writer..AGGREGATES).step_by(4) {
                    let events: Vec<NewEvent> = (0..PER_APPEND)
                        .map(|i| {
                            event(
                                "Deposited",
                                serde_json::json!({ "amount": round * PER_APPEND + i }),
                            )
                        })
                        .collect();
                    ids.extend(events.iter().map(|e| e.event_id));
                    let recorded = store
                        .append(AppendRequest {
                            aggregate_type: "account".into(),
                            aggregate_id: format!("acc-{aggregate:03}"),
                            expected_version: (round * PER_APPEND) as u64,
                            events,
                        })
                        .await
                        .expect("append");
                    last = last.max(recorded.last().expect("written").checkpoint());
                    written.fetch_add(PER_APPEND, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }
            (ids, last)
        }));
    }

    // Two outages, each while the relay and the consumer are busy: SIGKILL,
    // two seconds down, then the same server (port, storage) again. Each
    // outage must make the relay retry (its acks time out after 1 s).
    let mut outages_seen = Vec::new();
    for threshold in [TOTAL * 3 / 10, TOTAL * 7 / 10] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while written.load(Ordering::Relaxed) < threshold {
            assert!(Instant::now() < deadline, "writers stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        nats.kill();
        let down = Instant::now();
        let mut retried = false;
        while down.elapsed() < Duration::from_secs(2) {
            let status = runner.status().await.expect("status");
            retried |= status
                .iter()
                .any(|s| s.state == ProjectionState::Retrying && s.last_error.is_some());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nats.start();
        outages_seen.push(retried);
    }

    let mut expected_ids = HashSet::new();
    let mut head = Checkpoint::START;
    for writer in writers {
        let (ids, last) = writer.await.expect("writer");
        expected_ids.extend(ids);
        head = head.max(last);
    }
    assert_eq!(expected_ids.len(), TOTAL);
    runner
        .wait_for(head, &["relay"], Duration::from_secs(60))
        .await
        .expect("the relay published every event");
    let status = runner.status().await.expect("status");
    assert_eq!(status[0].parked, 0, "the relay never parks");
    assert_eq!(status[0].processed, TOTAL as u64);
    assert_eq!(
        outages_seen,
        [true, true],
        "each outage made the relay retry"
    );

    // The consumer applies every event once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let inbox = count(
            store.pool(),
            "SELECT count(*) FROM events_inbox WHERE handler = $1",
            "effects",
        )
        .await;
        if inbox as usize == TOTAL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer handled {inbox} of {TOTAL} messages within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    runner_stop.cancel();
    consumer_stop.cancel();
    runner_task.await.expect("runner task");
    consumer_task.await.expect("consumer task");

    // The stream holds every event id exactly once.
    let messages = read_stream(&relay_js, "RELAY_KILL").await;
    let ids: Vec<String> = messages.iter().map(|m| msg_id(m)).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), TOTAL, "stream holds {} messages", ids.len());
    assert_eq!(unique.len(), TOTAL, "duplicates in the stream");
    let expected: HashSet<String> = expected_ids.iter().map(Uuid::to_string).collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<HashSet<_>>(),
        expected,
        "the stream holds exactly the written events"
    );

    // Each applied once: one effect row per event, none applied twice.
    let (rows, max_applied, dead): (i64, Option<i32>, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM relay_effects), (SELECT max(applied) FROM relay_effects),
                (SELECT count(*) FROM events_dead_messages)",
    )
    .fetch_one(store.pool())
    .await
    .expect("effects");
    assert_eq!(rows as usize, TOTAL);
    assert_eq!(max_applied, Some(1), "an event was applied twice");
    assert_eq!(dead, 0);
    let effect_ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM relay_effects")
        .fetch_all(store.pool())
        .await
        .expect("effect ids");
    assert_eq!(
        effect_ids.into_iter().collect::<HashSet<_>>(),
        expected,
        "the consumer applied exactly the written events"
    );
    println!("relay test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_subjects_are_as_documented() {
    let db = common::TestDb::new("relay_headers").await;
    let store = db.store().await;
    let js = jetstream(&nats_url()).await;
    let suffix = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let stream = format!("HDR_{suffix}");
    let prefix = format!("hdr{suffix}");
    ensure_stream(
        &js,
        &stream,
        vec![format!("{prefix}.>")],
        Duration::from_secs(120),
    )
    .await
    .expect("stream");

    // Invalid settings are refused up front.
    assert!(JetStreamRelay::builder(js.clone(), "x")
        .subject_prefix("bad prefix")
        .build()
        .is_err());
    assert!(JetStreamRelay::builder(js.clone(), "").build().is_err());

    // An event with every optional field, names that need sanitizing...
    let correlation = Uuid::new_v4();
    let causation = Uuid::new_v4();
    let mut full = event(
        "Money.Deposited*",
        serde_json::json!({ "amount": 5, "note": "ä" }),
    );
    full.correlation_id = Some(correlation);
    full.causation_id = Some(causation);
    full.metadata.insert("user".into(), "ann".into());
    full.metadata.insert("k2".into(), "v 2".into());
    let full = store
        .append(AppendRequest {
            aggregate_type: "bank account".into(),
            aggregate_id: "acc 1".into(),
            expected_version: 0,
            events: vec![full],
        })
        .await
        .expect("append")
        .remove(0);
    // ... and a plain one, relayed with a custom subject mapping.
    let plain = store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "acc.2".into(),
            expected_version: 0,
            events: vec![event("Opened", serde_json::json!({ "owner": "bo" }))],
        })
        .await
        .expect("append")
        .remove(0);

    let default_relay = JetStreamRelay::builder(js.clone(), "hdr_default")
        .subject_prefix(prefix.clone())
        .filter(outflow::LogFilter::aggregate_types(["bank account"]))
        .build()
        .expect("relay");
    let custom_prefix = prefix.clone();
    let custom_relay = JetStreamRelay::builder(js.clone(), "hdr_custom")
        .subject(move |e: &RecordedEvent| {
            format!(
                "{custom_prefix}.custom.{}.{}",
                subject_token(&e.aggregate_id),
                e.sequence
            )
        })
        .filter(outflow::LogFilter::aggregate_types(["account"]))
        .build()
        .expect("relay");
    assert_eq!(
        default_relay.subject_for(&full),
        format!("{prefix}.bank_account.Money_Deposited_")
    );
    assert_eq!(
        custom_relay.subject_for(&plain),
        format!("{prefix}.custom.acc_2.1")
    );
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(default_relay).on_error(OnError::Stop))
        .projection(ProjectionOptions::new(custom_relay).on_error(OnError::Stop))
        .build()
        .expect("runner");
    let (stop, task) = common::start_runner(&runner);
    runner
        .wait_for(
            full.checkpoint().max(plain.checkpoint()),
            &["hdr_default", "hdr_custom"],
            Duration::from_secs(30),
        )
        .await
        .expect("relayed");
    stop.cancel();
    task.await.expect("runner task");

    let messages = read_stream(&js, &stream).await;
    assert_eq!(messages.len(), 2);
    let by_id: BTreeMap<String, &async_nats::jetstream::Message> =
        messages.iter().map(|m| (msg_id(m), m)).collect();

    let header_map = |m: &async_nats::Message| -> BTreeMap<String, String> {
        m.headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        (
                            AsRef::<str>::as_ref(k).to_owned(),
                            v.last().map(|v| v.as_str().to_owned()).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let recorded_at = |e: &RecordedEvent| {
        // RFC 3339 in UTC with microseconds, as documented.
        e.recorded_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    };

    let m = by_id[&full.event_id.to_string()];
    assert_eq!(
        m.subject.as_str(),
        format!("{prefix}.bank_account.Money_Deposited_")
    );
    let payload: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON payload");
    assert_eq!(payload, full.payload);
    let expected: BTreeMap<String, String> = [
        ("Nats-Msg-Id", full.event_id.to_string()),
        ("Outflow-Event-Type", "Money.Deposited*".into()),
        ("Outflow-Event-Version", "1".into()),
        ("Outflow-Aggregate-Type", "bank account".into()),
        ("Outflow-Aggregate-Id", "acc 1".into()),
        ("Outflow-Sequence", "1".into()),
        ("Outflow-Position", full.position.to_string()),
        ("Outflow-Transaction-Id", full.transaction_id.to_string()),
        ("Outflow-Recorded-At", recorded_at(&full)),
        ("Outflow-Correlation-Id", correlation.to_string()),
        ("Outflow-Causation-Id", causation.to_string()),
        ("Outflow-Metadata", r#"{"k2":"v 2","user":"ann"}"#.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(header_map(m), expected);
    assert_eq!(
        JetStreamRelay::headers_for(&full)
            .expect("headers")
            .get_last(headers::EVENT_TYPE)
            .map(|v| v.as_str()),
        Some("Money.Deposited*")
    );

    let m = by_id[&plain.event_id.to_string()];
    assert_eq!(m.subject.as_str(), format!("{prefix}.custom.acc_2.1"));
    let headers = header_map(m);
    assert_eq!(headers["Outflow-Aggregate-Id"], "acc.2");
    assert_eq!(headers["Outflow-Event-Type"], "Opened");
    for absent in [
        "Outflow-Correlation-Id",
        "Outflow-Causation-Id",
        "Outflow-Metadata",
    ] {
        assert!(
            !headers.contains_key(absent),
            "{absent} set without a value"
        );
    }
    assert_eq!(headers.len(), 9);
}

/// Counts how often the poison message was handed to the handler.
struct CountingPoison {
    inner: ApplyOnce,
    poison_calls: Arc<AtomicU32>,
    seen_deliveries: Arc<std::sync::Mutex<Vec<u64>>>,
    fallback_ids: Arc<AtomicBool>,
    handled_ids: Arc<std::sync::Mutex<Vec<String>>>,
    stream: String,
}

#[async_trait::async_trait]
impl MessageHandler<PostgresStore> for CountingPoison {
    async fn handle(
        &self,
        message: &ReceivedMessage,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        if let Ok(mut ids) = self.handled_ids.lock() {
            ids.push(message.message_id.clone());
        }
        if message.payload == b"poison" {
            self.poison_calls.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut seen) = self.seen_deliveries.lock() {
                seen.push(message.deliveries);
            }
        }
        if message.header(headers::MSG_ID).is_none()
            && message.message_id == format!("{}:{}", self.stream, message.stream_sequence)
        {
            self.fallback_ids.store(true, Ordering::SeqCst);
        }
        self.inner.handle(message, tx).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_parked_after_max_deliver_and_the_consumer_moves_on() {
    let db = common::TestDb::new("relay_poison").await;
    let store = db.store().await;
    create_effects(store.pool(), "poison_effects").await;
    let js = jetstream(&nats_url()).await;
    let suffix = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let stream = format!("POISON_{suffix}");
    let subject = format!("poison{suffix}.in");
    ensure_stream(
        &js,
        &stream,
        vec![format!("poison{suffix}.>")],
        Duration::from_secs(120),
    )
    .await
    .expect("stream");
    let publish = |id: Option<&str>, payload: &'static [u8]| {
        let js = js.clone();
        let subject = subject.clone();
        let id = id.map(str::to_owned);
        async move {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = id {
                headers.insert(headers::MSG_ID, id.as_str());
            }
            js.publish_with_headers(subject, headers, payload.into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    };
    for (id, payload) in [
        ("m1", &b"ok"[..]),
        ("m2", b"ok"),
        ("m3", b"poison"),
        ("m4", b"ok"),
        ("m5", b"ok"),
    ] {
        publish(Some(id), payload).await;
    }

    let poison_calls = Arc::new(AtomicU32::new(0));
    let seen_deliveries = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fallback_ids = Arc::new(AtomicBool::new(false));
    let handled_ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let dead_letters = PostgresDeadMessages::new("events").expect("table name");
    let consumer = JetStreamConsumer::builder(
        js.clone(),
        stream.clone(),
        "poison_test",
        store.clone(),
        CountingPoison {
            inner: ApplyOnce {
                table: "poison_effects",
            },
            poison_calls: poison_calls.clone(),
            seen_deliveries: seen_deliveries.clone(),
            fallback_ids: fallback_ids.clone(),
            handled_ids: handled_ids.clone(),
            stream: stream.clone(),
        },
    )
    .dead_letters(dead_letters.clone())
    .filter_subject(format!("poison{suffix}.>"))
    .max_deliver(3)
    .ack_wait(Duration::from_secs(5))
    .pull_expires(Duration::from_secs(2))
    .retry_backoff(Duration::from_millis(50), Duration::from_millis(200))
    .build()
    .expect("consumer");
    let (stop, task) = spawn_consumer(consumer);

    let deadline = Instant::now() + Duration::from_secs(30);
    let parked = loop {
        let parked = dead_letters
            .list(&store, "poison_test")
            .await
            .expect("dead letters");
        let applied = rows(store.pool(), "poison_effects").await;
        if !parked.is_empty() && applied == 4 {
            break parked;
        }
        assert!(
            Instant::now() < deadline,
            "within 30 s: {} parked, {applied} applied",
            parked.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(parked.len(), 1);
    let dead = &parked[0];
    assert_eq!(dead.message_id, "m3");
    assert_eq!(dead.consumer, "poison_test");
    assert_eq!(dead.stream, stream);
    assert_eq!(dead.stream_sequence, 3);
    assert_eq!(dead.subject, subject);
    assert_eq!(dead.payload, b"poison");
    assert_eq!(dead.deliveries, 3, "parked on the third delivery");
    assert!(dead.error.contains("poisoned payload"), "{}", dead.error);
    assert_eq!(
        dead.headers.get("Nats-Msg-Id"),
        Some(&vec!["m3".to_owned()])
    );
    let mut deliveries = seen_deliveries.lock().expect("lock").clone();
    deliveries.dedup();
    assert_eq!(deliveries, [1, 2, 3], "delivered three times, then parked");

    // It is not delivered again, and later messages still flow (one without
    // a message id uses `<stream>:<sequence>` as its inbox key). A message
    // whose id is already in the inbox (committed before, its
    // acknowledgement lost) is acknowledged without calling the handler.
    let calls = poison_calls.load(Ordering::SeqCst);
    sqlx::query("INSERT INTO events_inbox (handler, message_id) VALUES ($1, $2)")
        .bind("poison_test")
        .bind("m0")
        .execute(store.pool())
        .await
        .expect("inbox row");
    publish(Some("m6"), b"ok").await;
    publish(None, b"ok").await;
    publish(Some("m0"), b"ok").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let applied = rows(store.pool(), "poison_effects").await;
        if applied == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{applied} of 6 applied within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fallback_ids.load(Ordering::SeqCst));
    assert_eq!(
        count(
            store.pool(),
            "SELECT count(*) FROM poison_effects WHERE message_id = $1",
            &format!("{stream}:7"),
        )
        .await,
        1
    );
    let mut durable: PullConsumer = js
        .get_stream(&stream)
        .await
        .expect("stream")
        .get_consumer("poison_test")
        .await
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = durable.info().await.expect("consumer info");
        if info.num_ack_pending == 0 && info.num_pending == 0 && info.ack_floor.stream_sequence == 8
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages left unacknowledged after 30 s: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        poison_calls.load(Ordering::SeqCst),
        calls,
        "the parked message came back"
    );
    let handled = handled_ids.lock().expect("lock").clone();
    assert!(
        !handled.iter().any(|id| id == "m0"),
        "the handler ran for a message already in the inbox"
    );
    assert_eq!(
        count(
            store.pool(),
            "SELECT count(*) FROM poison_effects WHERE message_id = $1",
            "m0",
        )
        .await,
        0
    );
    let max_applied: Option<i32> = sqlx::query_scalar("SELECT max(applied) FROM poison_effects")
        .fetch_one(store.pool())
        .await
        .expect("max");
    assert_eq!(max_applied, Some(1));

    // Discarding removes the dead letter.
    assert!(dead_letters
        .discard(&store, dead.id)
        .await
        .expect("discard"));
    assert!(dead_letters
        .list(&store, "poison_test")
        .await
        .expect("list")
        .is_empty());
    stop.cancel();
    task.await.expect("consumer task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_messages_reach_jetstream_once_and_in_order_per_key() {
    use outflow::outbox::{Outbox, OutboxMessage, OutboxRelay};
    use outflow::relay::{JetStreamOutboxSink, OUTBOX_KEY_HEADER};

    let db = common::TestDb::new("outbox_nats").await;
    let store = db.store().await;
    let js = jetstream(&nats_url()).await;
    let stream = format!("OUTBOX_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let subject = format!("{}.orders", stream.to_lowercase());
    ensure_stream(
        &js,
        &stream,
        vec![subject.clone()],
        Duration::from_secs(120),
    )
    .await
    .expect("stream");
    let outbox = Outbox::new(&store).await.expect("outbox");

    // Twenty messages committed over several transactions, one rolled back.
    let mut sent: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for n in 0..20u32 {
        let key = format!("order-{}", n % 3);
        let mut tx = store.pool().begin().await.expect("begin");
        let id = outbox
            .enqueue(
                &mut tx,
                OutboxMessage::new(key.clone(), subject.clone(), serde_json::json!({ "n": n })),
            )
            .await
            .expect("enqueue");
        outbox.commit(tx).await.expect("commit");
        sent.entry(key).or_default().push(id);
    }
    let mut rolled_back = store.pool().begin().await.expect("begin");
    outbox
        .enqueue(
            &mut rolled_back,
            OutboxMessage::new("order-0", subject.clone(), serde_json::json!({ "n": -1 })),
        )
        .await
        .expect("enqueue");
    rolled_back.rollback().await.expect("rollback");

    let relay = OutboxRelay::builder(outbox.clone(), JetStreamOutboxSink::new(js.clone()))
        .build()
        .expect("relay");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let relay = relay.clone();
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox.status().await.expect("status").pending > 0 {
        assert!(
            Instant::now() < deadline,
            "the outbox was not drained within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.expect("relay task").expect("relay");

    let messages = read_stream(&js, &stream).await;
    assert_eq!(
        messages.len(),
        20,
        "every committed message once, none rolled back"
    );
    let mut received: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for message in &messages {
        let headers = message.headers.as_ref().expect("headers");
        let key = headers
            .get(OUTBOX_KEY_HEADER)
            .expect("key header")
            .as_str()
            .to_owned();
        let id: Uuid = headers
            .get("Nats-Msg-Id")
            .expect("message id")
            .as_str()
            .parse()
            .expect("a uuid");
        received.entry(key).or_default().push(id);
    }
    assert_eq!(received, sent, "same messages, same order within each key");
}

/// The broker away for a long outage (20 s; `OUTFLOW_OUTAGE_SECONDS`
/// shortens or lengthens it) while events keep being appended: the relay
/// says so in status all along, publishes everything once the broker is
/// back, and the stream holds each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_broker_outage_shows_in_status_and_loses_nothing() {
    let outage = Duration::from_secs(
        std::env::var("OUTFLOW_OUTAGE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let db = common::TestDb::new("relay_outage").await;
    let store = db.store().await;
    let mut nats = OwnNats::start_new();
    let js = jetstream(&nats.url()).await;
    ensure_stream(
        &js,
        "OUTAGE",
        vec!["outage.>".into()],
        Duration::from_secs(600),
    )
    .await
    .expect("stream");
    let relay = JetStreamRelay::builder(js.clone(), "relay")
        .subject_prefix("outage")
        .ack_timeout(Duration::from_secs(1))
        .build()
        .expect("relay");
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(relay).retry(fast_retries()))
        .build()
        .expect("runner");
    let (runner_stop, runner_task) = common::start_runner(&runner);

    let mut ids = Vec::new();
    let mut version = 0;
    let mut append = |store: PostgresStore| {
        version += 1;
        let event = event("Ticked", serde_json::json!({ "Ticked": { "n": version } }));
        ids.push(event.event_id);
        let expected_version = version - 1;
        async move {
            store
                .append(AppendRequest {
                    aggregate_type: "clock".into(),
                    aggregate_id: "c".into(),
                    expected_version,
                    events: vec![event],
                })
                .await
                .expect("append")[0]
                .checkpoint()
        }
    };
    let mut last = Checkpoint::START;
    for _ in 0..100 {
        last = append(store.clone()).await;
    }
    runner
        .wait_for(last, &["relay"], Duration::from_secs(30))
        .await
        .expect("relayed before the outage");

    nats.kill();
    let down = Instant::now();
    let (mut samples, mut showing) = (0, 0);
    while down.elapsed() < outage {
        last = append(store.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // After the first failed attempt (the acknowledgement times out in
        // 1 s), status says the relay is retrying, and why, all along.
        if down.elapsed() > Duration::from_secs(3) {
            let status = runner.status().await.expect("status");
            samples += 1;
            if status[0].state == ProjectionState::Retrying && status[0].last_error.is_some() {
                showing += 1;
            } else {
                panic!("during the outage: {:?}", status[0]);
            }
        }
    }
    let relayed_before = runner.status().await.expect("status")[0].processed;
    nats.start();
    for _ in 0..100 {
        last = append(store.clone()).await;
    }
    runner
        .wait_for(last, &["relay"], Duration::from_secs(60))
        .await
        .expect("the relay published everything once the broker was back");
    let status = runner.status().await.expect("status");
    assert_eq!(status[0].state, ProjectionState::Live, "{:?}", status[0]);
    assert_eq!(status[0].processed, ids.len() as u64);
    common::stop_runner(runner_stop, runner_task).await;

    let messages = read_stream(&js, "OUTAGE").await;
    let got: Vec<String> = messages.iter().map(|m| msg_id(m)).collect();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicates in the stream");
    let expected: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<HashSet<_>>(),
        expected,
        "the stream holds exactly the appended events"
    );
    println!(
        "outage of {outage:?}: {} events appended ({} during it), status showed it in {showing} of {samples} samples, {relayed_before} relayed before it ended",
        ids.len(),
        ids.len() - 200,
    );
}
