//! The operators' console (`outflow::admin`) mounted in a real HTTP server
//! beside a running node, driven by an HTTP client: off unless configured,
//! readers and operators told apart, payloads hidden from readers, a
//! rebuild followed to its end over server-sent events, pause and resume,
//! a dead letter retried (failing, then handled) and discarded, the log
//! browsed by stream, type and correlation and paged, the live tail, the
//! plots' figures, and hostile input answered with 4xx, never 5xx.

use outflow_tests as common;

use common::tally::{tallied, Tally};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outflow::admin::{Admin, Principal, Role};
use outflow::projection::{OnError, ProjectionOptions, RetryPolicy};
use outflow::runner::ProjectionRunner;
use outflow::{AppendRequest, EventStore, NewEvent, RecordedEvent, SqliteStore};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn deposit(amount: u64, correlation: Option<uuid::Uuid>) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Deposited".into(),
        event_version: "1".into(),
        payload: json!({"Deposited": {"amount": amount, "note": "<script>alert(1)</script>"}}),
        metadata: Default::default(),
        correlation_id: correlation,
        causation_id: None,
    }
}

async fn append(store: &SqliteStore, kind: &str, id: &str, events: Vec<NewEvent>) -> RecordedEvent {
    let version = store
        .read_stream(kind, id, 0, 10_000)
        .await
        .expect("read")
        .len() as u64;
    store
        .append(AppendRequest {
            aggregate_type: kind.into(),
            aggregate_id: id.into(),
            expected_version: version,
            events,
        })
        .await
        .expect("append")
        .pop()
        .expect("an event")
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("GET");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.http.post(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("POST");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Reads server-sent events until `until` says stop (60 s at most).
    async fn events(
        &self,
        path: &str,
        token: &str,
        mut until: impl FnMut(&str, &Value) -> bool,
    ) -> Vec<(String, Value)> {
        let mut response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET events");
        assert_eq!(response.status(), StatusCode::OK);
        let mut seen = Vec::new();
        let mut buffer = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let chunk = tokio::time::timeout_at(deadline.into(), response.chunk())
                .await
                .expect("events arrive in time")
                .expect("read events");
            let Some(chunk) = chunk else { return seen };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(cut) = buffer.find("\n\n") {
                let block: String = buffer.drain(..cut + 2).collect();
                let mut name = "message".to_owned();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event:") {
                        name = n.trim().to_owned();
                    }
                    if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::String(data));
                let stop = until(&name, &value);
                seen.push((name, value));
                if stop {
                    return seen;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_acts_and_browses_for_those_allowed() {
    let dir = common::TestDir::new("admin_console");
    let store = dir.sqlite().await;
    let correlation = uuid::Uuid::now_v7();
    for i in 0..30u64 {
        append(
            &store,
            "account",
            &format!("a-{i}"),
            vec![deposit(i + 1, None)],
        )
        .await;
    }
    append(
        &store,
        "account",
        "a-1",
        vec![deposit(5, Some(correlation)), deposit(6, Some(correlation))],
    )
    .await;
    let poison = append(&store, "account", "poison", vec![deposit(666, None)]).await;
    let broken = Arc::new(AtomicBool::new(true));
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
    let (shutdown, handle) = common::start_runner(&runner);
    let _ = runner
        .wait_for(poison.checkpoint(), &["tally"], Duration::from_secs(60))
        .await;

    // Off unless configured.
    let off = Client {
        base: common::serve_console(Admin::new(runner.clone()).operator_token("").router()).await,
        http: reqwest::Client::new(),
    };
    let (status, body) = off.get("/api/status", Some("anything")).await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::FORBIDDEN, json!("disabled"))
    );
    assert_eq!(off.get("", None).await.0, StatusCode::FORBIDDEN);

    let console = Client {
        base: common::serve_console(
            Admin::new(runner.clone())
                .operator_token("op-secret")
                .reader_token("read-secret")
                .events(store.clone())
                .sample_every(Duration::from_millis(100))
                .router(),
        )
        .await,
        http: reqwest::Client::new(),
    };
    let (op, reader) = (Some("op-secret"), Some("read-secret"));

    // Who may do what.
    assert_eq!(
        console.get("/api/status", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        console.get("/api/status", Some("op-secreT")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, me) = console.get("/api/whoami", reader).await;
    assert_eq!(
        (status, me["role"].clone()),
        (StatusCode::OK, json!("reader"))
    );
    let (status, body) = console.post("/api/projections/tally/pause", reader).await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::FORBIDDEN, json!("forbidden"))
    );
    let page = console.http.get(&console.base).send().await.expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.expect("html").contains("Outflow console"));

    // Status: the unit, its lag and its parked event; nodes and their units.
    let (status, body) = console.get("/api/status", reader).await;
    assert_eq!(status, StatusCode::OK);
    let unit = &body["units"][0];
    assert_eq!(unit["projection"], json!("tally"));
    assert_eq!(unit["parked"], json!(1), "{body}");
    assert_eq!(body["nodes"][0]["units"], json!(["tally/0"]), "{body}");

    // Payloads: hidden from readers, shown to operators; never 5xx on bad input.
    let (_, page) = console.get("/api/events?stream=account/a-1", reader).await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(3), "{page}");
    assert_eq!(page["events"][0]["payload_hidden"], json!(true));
    assert!(page["events"][0].get("payload").is_none());
    let (_, page) = console.get("/api/events?stream=account/a-1", op).await;
    assert_eq!(
        page["events"][0]["payload"]["Deposited"]["amount"],
        json!(2)
    );
    let (_, page) = console
        .get(&format!("/api/events?correlation={correlation}"), op)
        .await;
    let amounts: Vec<Value> = page["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|e| e["payload"]["Deposited"]["amount"].clone())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(amounts, vec![json!(5), json!(6)]);
    let (_, first) = console.get("/api/events?type=account&limit=10", op).await;
    assert_eq!(first["events"].as_array().map(Vec::len), Some(10));
    let next = first["next"].as_str().expect("a next page").to_owned();
    let (_, second) = console
        .get(
            &format!("/api/events?type=account&limit=10&after={next}"),
            op,
        )
        .await;
    assert_eq!(second["events"][0]["position"], json!(11), "{second}");
    // A range of positions: after the fifth event, to the eighth.
    let events = first["events"].as_array().cloned().unwrap_or_default();
    let checkpoint = |e: &Value| format!("{}.{}", e["transaction_id"], e["position"]);
    let (_, range) = console
        .get(
            &format!(
                "/api/events?after={}&to={}",
                checkpoint(&events[4]),
                checkpoint(&events[7])
            ),
            op,
        )
        .await;
    let positions: Vec<Value> = range["events"]
        .as_array()
        .map(|e| e.iter().map(|e| e["position"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(
        positions,
        vec![
            events[5]["position"].clone(),
            events[6]["position"].clone(),
            events[7]["position"].clone()
        ],
        "{range}"
    );
    assert_eq!(range["next"], Value::Null, "a range ends: {range}");
    for bad in [
        "/api/events?stream=nonsense",
        "/api/events?after=1",
        "/api/events?to=soon",
        "/api/events?correlation=xyz",
        "/api/events?limit=-3",
    ] {
        let (status, body) = console.get(bad, op).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    for (path, expected) in [
        ("/api/projections/nope/pause", StatusCode::NOT_FOUND),
        (
            "/api/projections/tally/dead-letters/12x/retry",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/projections/tally/dead-letters/999/discard",
            StatusCode::NOT_FOUND,
        ),
    ] {
        assert_eq!(console.post(path, op).await.0, expected, "{path}");
    }

    // A dead letter: retried while still broken (422, its attempts counted),
    // then fixed and retried: handled, gone.
    let (_, letters) = console
        .get("/api/projections/tally/dead-letters", reader)
        .await;
    let id = letters[0]["id"].as_u64().expect("a dead letter");
    let (status, body) = console
        .post(
            &format!("/api/projections/tally/dead-letters/{id}/retry"),
            op,
        )
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("failed_again"))
    );
    broken.store(false, Ordering::SeqCst);
    let (status, _) = console
        .post(
            &format!("/api/projections/tally/dead-letters/{id}/retry"),
            op,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, letters) = console
        .get("/api/projections/tally/dead-letters", reader)
        .await;
    assert_eq!(letters, json!([]));
    assert_eq!(tallied(&store).await, 33);

    // A rebuild, followed over server-sent events to its end.
    let (status, started) = console.post("/api/projections/tally/rebuild", op).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(started["total"], json!(33));
    let progress = console
        .events(
            "/api/projections/tally/rebuild",
            "read-secret",
            |name, _| name == "done",
        )
        .await;
    let (last, value) = progress.last().expect("events");
    assert_eq!(last, "done");
    assert_eq!(value, &json!({"done": 33, "total": 33}));
    assert_eq!(tallied(&store).await, 33);

    // Paused, then resumed: what comes meanwhile waits, then is applied.
    assert_eq!(
        console.post("/api/projections/tally/pause", op).await.0,
        StatusCode::OK
    );
    let (_, body) = console.get("/api/status", reader).await;
    assert_eq!(body["units"][0]["paused"], json!(true));
    assert_eq!(
        console.post("/api/projections/tally/resume", op).await.0,
        StatusCode::OK
    );
    let later = append(&store, "account", "late", vec![deposit(7, None)]).await;
    runner
        .wait_for(later.checkpoint(), &["tally"], Duration::from_secs(60))
        .await
        .expect("applied after the resume");

    // The live tail: events appended after it starts, in order.
    let from = later.checkpoint();
    let tail = {
        let client = Client {
            base: console.base.clone(),
            http: reqwest::Client::new(),
        };
        let path = format!("/api/tail?after={}.{}", from.transaction_id, from.position);
        tokio::spawn(async move {
            client
                .events(&path, "op-secret", |_, value| {
                    value["aggregate_id"] == json!("tail-2")
                })
                .await
        })
    };
    append(&store, "account", "tail-1", vec![deposit(1, None)]).await;
    append(&store, "account", "tail-2", vec![deposit(2, None)]).await;
    let tailed = tail.await.expect("the tail");
    let ids: Vec<Value> = tailed
        .iter()
        .filter(|(name, _)| name == "event")
        .map(|(_, v)| v["aggregate_id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("tail-1"), json!("tail-2")]);

    // The plots' figures.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, samples) = console.get("/api/samples", reader).await;
        if samples["tally"].as_array().is_some_and(|s| s.len() >= 2) {
            assert!(samples["tally"][1]["lag_events"].is_u64(), "{samples}");
            break;
        }
        assert!(Instant::now() < deadline, "no samples: {samples}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_own_check_decides_who_may_do_what() {
    let dir = common::TestDir::new("admin_hook");
    let store = dir.sqlite().await;
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(Tally {
            broken: Arc::new(AtomicBool::new(false)),
        }))
        .build()
        .expect("runner");
    let console = Client {
        base: common::serve_console(
            Admin::new(runner)
                .authorize(
                    |headers| match headers.get("x-user").and_then(|v| v.to_str().ok()) {
                        Some("ann") => Some(Principal::new("ann", Role::Operator)),
                        Some(user) => Some(Principal::new(user, Role::Reader)),
                        None => None,
                    },
                )
                .router(),
        )
        .await,
        http: reqwest::Client::new(),
    };
    let whoami = |user: &'static str| {
        console
            .http
            .get(format!("{}/api/whoami", console.base))
            .header("x-user", user)
            .send()
    };
    let me: Value = whoami("ann")
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(me, json!({"name": "ann", "role": "operator"}));
    let me: Value = whoami("bob")
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(me["role"], json!("reader"));
    assert_eq!(
        console.get("/api/whoami", None).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_plots_commands_and_the_outbox_backlog() {
    use outflow::doc_fixture::{Counter, CounterCommand};
    use outflow::outbox::{Outbox, OutboxMessage};
    use outflow::CommandBus;

    let dir = common::TestDir::new("admin_activity");
    let store = dir.sqlite().await;
    let outbox = Outbox::new(&store).await.expect("outbox");
    // Five messages no relay delivers: the backlog.
    for n in 0..5 {
        outbox
            .send(OutboxMessage::new("k", "test.pending", json!({ "n": n })))
            .await
            .expect("send");
    }
    let runner = ProjectionRunner::builder(store.clone())
        .build()
        .expect("runner");
    let console = Client {
        base: common::serve_console(
            Admin::new(runner)
                .reader_token("read-secret")
                .outbox(outbox.clone())
                .sample_every(Duration::from_millis(100))
                .router(),
        )
        .await,
        http: reqwest::Client::new(),
    };
    let reader = Some("read-secret");
    let counters = CommandBus::<Counter, _>::new(store.clone(), ());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Commands keep running while the samples are taken.
        for i in 0..10 {
            counters
                .execute(&format!("c-{i}"), CounterCommand::Increment { by: 1 })
                .await
                .expect("increment");
        }
        let (status, activity) = console.get("/api/activity", reader).await;
        assert_eq!(status, StatusCode::OK, "{activity}");
        assert_eq!(activity["outbox"], json!("events_outbox"), "{activity}");
        let samples = activity["samples"].as_array().cloned().unwrap_or_default();
        let commanded = samples
            .iter()
            .any(|s| s["commands_per_second"].as_f64().is_some_and(|r| r > 0.0));
        let last = samples.last().cloned().unwrap_or(Value::Null);
        if commanded && last["outbox_pending"] == json!(5) {
            assert!(last["outbox_oldest_ms"].is_u64(), "{last}");
            assert!(last["conflicts_per_second"].is_f64(), "{last}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no commands/s or outbox backlog in the samples: {activity}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Readers only: the figures need no operator.
    assert_eq!(
        console.get("/api/activity", None).await.0,
        StatusCode::UNAUTHORIZED
    );
}
