//! PostgreSQL restarted under load: a server of the test's own is restarted
//! twice (`pg_ctl restart -m fast`) while 8 writers run commands and a
//! ninth enqueues outbox messages, a projection runner keeps a read model
//! and relays every event to JetStream, and the outbox relay publishes the
//! messages. Writers get typed, transient errors while the server is away
//! and go on; the runner and the relay reconnect and resume. Afterwards
//! every command that reported success has its event in the log once, no
//! event is there twice, the read model equals the fold of the log, the
//! stream holds each event once, and the outbox's stream each committed
//! message once.
//!
//! Needs `OUTFLOW_PG_BIN` (the server's binaries) and `NATS_URL`, which
//! `scripts/test.sh` sets; as root it runs the server as
//! `OUTFLOW_PG_SERVICE_USER` (default `postgres`).

use outflow_tests as common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use example_accounts::{BankAccount, BankCommand};
use outflow::outbox::{Outbox, OutboxMessage, OutboxRelay};
use outflow::projection::{ProjectionOptions, RetryPolicy};
use outflow::relay::{ensure_stream, JetStreamOutboxSink, JetStreamRelay};
use outflow::runner::ProjectionRunner;
use outflow::{Checkpoint, CommandBus, CommandError, EventLog, LogFilter, RecordedEvent};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WRITERS: usize = 8;
const ACCOUNTS_PER_WRITER: usize = 5;
const RESTARTS: usize = 2;

/// What the writers saw.
#[derive(Default)]
struct Outcomes {
    /// (account, amount) of every deposit that reported success.
    succeeded: Vec<(String, i64)>,
    /// Amounts of deposits that reported an error (they may or may not
    /// have committed).
    failed: HashSet<i64>,
    /// The kinds of the errors.
    kinds: HashMap<String, usize>,
}

/// The outbox writer's outcomes: message ids committed, ids whose commit's
/// outcome is unknown, and attempts refused before their commit.
type Enqueued = (Vec<Uuid>, HashSet<Uuid>, usize);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_lose_nothing_and_apply_nothing_twice() {
    let server = common::own_postgres::OwnPostgres::start_new();
    let store = common::own_postgres::connect(&server.url()).await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let stream = format!("RESTART_{suffix}");
    let prefix = format!("restart_{suffix}");
    let js = common::nats::jetstream(&std::env::var("NATS_URL").expect(
        "NATS_URL is not set: run the tests with scripts/test.sh, which starts nats-server",
    ))
    .await;
    ensure_stream(
        &js,
        &stream,
        vec![format!("{prefix}.>")],
        Duration::from_secs(600),
    )
    .await
    .expect("the stream");
    let relay = JetStreamRelay::builder(js.clone(), "relay")
        .subject_prefix(prefix.clone())
        .ack_timeout(Duration::from_secs(2))
        .build()
        .expect("a relay");
    let patient = RetryPolicy {
        max_attempts: 100,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(500),
    };
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(common::totals::Totals).retry(patient))
        .projection(ProjectionOptions::new(relay).retry(patient))
        .build()
        .expect("a runner");
    let (runner_stop, runner_task) = common::start_runner(&runner);

    // The outbox: code that is not event-sourced enqueues messages in its
    // own transactions; the outbox relay publishes them to JetStream.
    let outbox_subject = format!("{prefix}_outbox.orders");
    let outbox_stream = format!("RESTART_OUTBOX_{suffix}");
    ensure_stream(
        &js,
        &outbox_stream,
        vec![outbox_subject.clone()],
        Duration::from_secs(600),
    )
    .await
    .expect("the outbox stream");
    let outbox = Outbox::new(&store).await.expect("the outbox");
    let outbox_relay = OutboxRelay::builder(outbox.clone(), JetStreamOutboxSink::new(js.clone()))
        .build()
        .expect("the outbox relay");
    let outbox_stop = CancellationToken::new();
    let outbox_task = tokio::spawn({
        let relay = outbox_relay.clone();
        let stop = outbox_stop.clone();
        async move { relay.run(stop).await }
    });

    let bus = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    let accounts: Vec<String> = (0..WRITERS * ACCOUNTS_PER_WRITER)
        .map(|i| format!("acc-{i:02}"))
        .collect();
    for account in &accounts {
        bus.execute(
            account,
            BankCommand::Open {
                owner: account.clone(),
            },
        )
        .await
        .expect("open");
    }

    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let mine: Vec<String> = accounts
            .iter()
            .skip(writer)
            .step_by(WRITERS)
            .cloned()
            .collect();
        let (bus, outcomes, stop) = (bus.clone(), outcomes.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut next = 0i64;
            while !stop.is_cancelled() {
                for account in &mine {
                    next += 1;
                    // Unique per command: the log tells which ones committed.
                    let amount = (writer as i64 + 1) * 1_000_000 + next;
                    let result = bus.execute(account, BankCommand::Deposit { amount }).await;
                    let failed = {
                        let mut seen = outcomes.lock().expect("outcomes");
                        match result {
                            Ok(_) => {
                                seen.succeeded.push((account.clone(), amount));
                                false
                            }
                            Err(error) => {
                                let kind = match &error {
                                    CommandError::Store(e) => e.kind().to_string(),
                                    other => format!("not a store error: {other}"),
                                };
                                *seen.kinds.entry(kind).or_default() += 1;
                                seen.failed.insert(amount);
                                true
                            }
                        }
                    };
                    if failed {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }

    // A ninth writer enqueues outbox messages.
    let enqueued: Arc<Mutex<Enqueued>> = Arc::default();
    writers.push(tokio::spawn({
        let (store, outbox, stop, enqueued) = (
            store.clone(),
            outbox.clone(),
            stop.clone(),
            enqueued.clone(),
        );
        let subject = outbox_subject.clone();
        async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let message = OutboxMessage::new(
                    format!("order-{}", n % 4),
                    subject.clone(),
                    json!({ "n": n }),
                );
                let attempt = async {
                    let mut tx = store.pool().begin().await.map_err(|e| e.to_string())?;
                    let id = outbox
                        .enqueue(&mut tx, message)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((id, outbox.commit(tx).await.map_err(|e| e.to_string())))
                };
                match attempt.await {
                    Ok((id, Ok(()))) => enqueued.lock().expect("enqueued").0.push(id),
                    Ok((id, Err(_))) => {
                        // The commit's outcome is unknown.
                        enqueued.lock().expect("enqueued").1.insert(id);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(_) => {
                        enqueued.lock().expect("enqueued").2 += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }));

    for _ in 0..RESTARTS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let server_ref = &server;
        tokio::task::block_in_place(|| server_ref.pg_ctl("restart"));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    for writer in writers {
        writer.await.expect("a writer");
    }

    let target = store
        .committed_head()
        .await
        .expect("the last committed event");
    runner
        .wait_for(target, &["totals", "relay"], Duration::from_secs(120))
        .await
        .expect("the runner and the relay caught up after the restarts");
    common::stop_runner(runner_stop, runner_task).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while outbox.status().await.expect("outbox status").pending > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox was not drained after the restarts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    outbox_stop.cancel();
    outbox_task
        .await
        .expect("the outbox relay's task")
        .expect("the outbox relay");

    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    let log = common::read_until(&store, Checkpoint::START, &LogFilter::all(), 1).await;
    let log: Vec<RecordedEvent> = {
        let mut all = log;
        loop {
            let more = store
                .read_log(
                    all.last().map_or(Checkpoint::START, |e| e.checkpoint()),
                    &LogFilter::all(),
                    10_000,
                )
                .await
                .expect("read the log");
            if more.is_empty() {
                break all;
            }
            all.extend(more);
        }
    };
    // Every deposit in the log once; every reported success among them;
    // every other one a command that reported an error.
    let mut logged: BTreeMap<i64, String> = BTreeMap::new();
    let mut fold: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for event in &log {
        let amount = event.payload["Deposited"]["amount"].as_i64().unwrap_or(0);
        let entry = fold.entry(event.aggregate_id.clone()).or_default();
        entry.0 += amount;
        entry.1 += 1;
        if amount != 0 {
            assert!(
                logged.insert(amount, event.aggregate_id.clone()).is_none(),
                "deposit {amount} logged twice"
            );
        }
    }
    for (account, amount) in &outcomes.succeeded {
        assert_eq!(
            logged.get(amount),
            Some(account),
            "an acknowledged deposit is missing"
        );
    }
    for amount in logged.keys() {
        assert!(
            outcomes.succeeded.iter().any(|(_, a)| a == amount) || outcomes.failed.contains(amount),
            "deposit {amount} in the log was never sent"
        );
    }
    let failures: usize = outcomes.kinds.values().sum();
    assert!(failures > 0, "no writer noticed the restarts");
    for kind in outcomes.kinds.keys() {
        assert_eq!(kind, "transient", "{:?}", outcomes.kinds);
    }

    // The read model equals the fold of the log.
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT account, sum, events FROM totals ORDER BY account")
            .fetch_all(store.pool())
            .await
            .expect("read the totals");
    let totals: BTreeMap<String, (i64, i64)> =
        rows.into_iter().map(|(a, s, n)| (a, (s, n))).collect();
    assert_eq!(totals, fold, "the read model differs from the log");

    // The stream holds each event once.
    let messages = common::nats::read_stream(&js, &stream).await;
    let ids: HashSet<String> = messages.iter().map(|m| common::nats::msg_id(m)).collect();
    assert_eq!(ids.len(), messages.len(), "an event was published twice");
    let expected: HashSet<String> = log.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(ids, expected, "the stream differs from the log");
    // The outbox's stream holds every committed message once.
    let (committed_messages, unknown, refused) =
        std::mem::take(&mut *enqueued.lock().expect("enqueued"));
    let outbox_messages = common::nats::read_stream(&js, &outbox_stream).await;
    let outbox_ids: Vec<String> = outbox_messages
        .iter()
        .map(|m| common::nats::msg_id(m))
        .collect();
    let unique: HashSet<&String> = outbox_ids.iter().collect();
    assert_eq!(
        unique.len(),
        outbox_ids.len(),
        "an outbox message was published twice"
    );
    for id in &committed_messages {
        assert!(
            unique.contains(&id.to_string()),
            "committed outbox message {id} missing"
        );
    }
    for id in &unique {
        let id: Uuid = id.parse().expect("a uuid");
        assert!(
            committed_messages.contains(&id) || unknown.contains(&id),
            "outbox message {id} was never committed"
        );
    }
    println!(
        "outbox: {} messages committed, {} refused, {} with an unknown outcome, {} published",
        committed_messages.len(),
        refused,
        unknown.len(),
        outbox_ids.len()
    );
    println!(
        "{RESTARTS} restarts; {} deposits acknowledged, {} failed ({:?}), {} events logged, {} relayed",
        outcomes.succeeded.len(),
        failures,
        outcomes.kinds,
        log.len(),
        messages.len()
    );
}
