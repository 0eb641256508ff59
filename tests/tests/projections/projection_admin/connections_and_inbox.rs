//! A killed LISTEN connection replaced, and the inbox that makes an outside
//! effect happen once per event.

use super::*;

// ---------------------------------------------------------------------------
// c. A killed LISTEN connection

async fn listen_pids(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
          WHERE datname = current_database() AND query LIKE 'LISTEN%' ORDER BY pid",
    )
    .fetch_all(pool)
    .await
    .expect("read pg_stat_activity")
}

/// Polls until a `LISTEN` connection other than `old` exists.
async fn new_listener(pool: &PgPool, old: &[i32], within: Duration) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let pids = listen_pids(pool).await;
        if pids.iter().any(|pid| !old.contains(pid)) {
            return pids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new LISTEN connection within {within:?} (had {old:?}, now {pids:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_listen_connection_is_replaced_and_polling_covers_the_gap() {
    let db = common::TestDb::new("admin_listen").await;
    let store = PostgresStore::builder(db.pool(20).await)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("store");
    Balances::create_table(store.pool()).await.expect("table");
    // Commands come from another store that sends no NOTIFY: the runner's
    // store only learns of them by notification from nobody, or by polling.
    let writer = PostgresStore::builder(db.pool(5).await)
        .notify_other_nodes(false)
        .build()
        .await
        .expect("writer store");
    let bus = CommandBus::<BankAccount, _>::new(writer, ());

    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Balances::new()))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_balances"]).await;
    let opened = bus
        .execute(
            "acc-1",
            BankCommand::Open {
                owner: "Ann".into(),
            },
        )
        .await
        .expect("open");
    runner
        .wait_for(
            opened.checkpoint().expect("written"),
            &["account_balances"],
            WAIT,
        )
        .await
        .expect("caught up");

    // The runner's store listens; kill that connection from the server side.
    let admin = db.pool(2).await;
    let before = new_listener(&admin, &[], WAIT).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
          WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&admin)
    .await
    .expect("terminate the LISTEN connection");
    assert!(
        !killed.is_empty() && killed.iter().all(|k| *k),
        "{killed:?}"
    );

    // New events are still projected.
    let mut last = None;
    for amount in [10, 20, 30] {
        last = bus
            .execute("acc-1", BankCommand::Deposit { amount })
            .await
            .expect("deposit")
            .checkpoint();
    }
    runner
        .wait_for(last.expect("written"), &["account_balances"], WAIT)
        .await
        .expect("the runner keeps catching up");
    assert_eq!(balance_of(store.pool(), "acc-1").await, Some(60));

    // And the store listens again, on a new connection.
    let after = new_listener(&admin, &before, Duration::from_secs(10)).await;
    assert!(after.iter().all(|pid| !before.contains(pid)), "{after:?}");

    // Still live afterwards.
    let last = bus
        .execute("acc-1", BankCommand::Withdraw { amount: 1 })
        .await
        .expect("withdraw")
        .checkpoint()
        .expect("written");
    runner
        .wait_for(last, &["account_balances"], WAIT)
        .await
        .expect("live after re-listening");
    assert_eq!(balance_of(store.pool(), "acc-1").await, Some(59));

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

// ---------------------------------------------------------------------------
// d. Outside effects with the inbox

/// "Sends an e-mail" per account event (appends its id to a list outside
/// the database), guarded by the inbox. Fails once, after sending, on
/// `fail_after_send`.
struct Mailer {
    store: PostgresStore,
    outbox: Arc<Mutex<Vec<Uuid>>>,
    deliveries: Arc<AtomicUsize>,
    fail_after_send: Arc<Mutex<Option<Uuid>>>,
}

#[async_trait]
impl Projection<PostgresStore> for Mailer {
    fn name(&self) -> &str {
        "mailer"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            self.deliveries.fetch_add(1, Ordering::SeqCst);
            if !self
                .store
                .inbox_claim(tx, "mailer", &event.event_id.to_string())
                .await?
            {
                continue;
            }
            self.outbox
                .lock()
                .map_err(|_| HandlerError::msg("outbox lock poisoned"))?
                .push(event.event_id);
            let mut fail = self
                .fail_after_send
                .lock()
                .map_err(|_| HandlerError::msg("lock poisoned"))?;
            if *fail == Some(event.event_id) {
                *fail = None;
                return Err(HandlerError::msg(
                    "the commit fails after the e-mail went out",
                ));
            }
        }
        Ok(())
    }
}

fn sent_counts(outbox: &Mutex<Vec<Uuid>>) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::new();
    for id in outbox.lock().expect("outbox lock").iter() {
        *counts.entry(*id).or_default() += 1;
    }
    counts
}

async fn inbox_ids(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT message_id FROM events_inbox WHERE handler = 'mailer' ORDER BY message_id",
    )
    .fetch_all(pool)
    .await
    .expect("read the inbox")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_inbox_makes_an_outside_effect_happen_once_per_event() {
    let db = common::TestDb::new("admin_inbox").await;
    let store = db.store().await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let mut written: Vec<(Uuid, Checkpoint)> = Vec::new();
    for i in 0..3 {
        let id = format!("acc-{i}");
        for command in [
            BankCommand::Open {
                owner: format!("owner {i}"),
            },
            BankCommand::Deposit { amount: 10 },
            BankCommand::Withdraw { amount: 3 },
        ] {
            let committed = bus.execute(&id, command).await.expect("command");
            written.extend(
                committed
                    .events
                    .iter()
                    .map(|e| (e.event_id, e.checkpoint())),
            );
        }
    }
    let target = written.last().expect("written").1;
    let failing = written[4].0;

    let outbox = Arc::new(Mutex::new(Vec::new()));
    let deliveries = Arc::new(AtomicUsize::new(0));
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(Mailer {
                store: store.clone(),
                outbox: outbox.clone(),
                deliveries: deliveries.clone(),
                fail_after_send: Arc::new(Mutex::new(Some(failing))),
            })
            // One event per transaction: a failure repeats only its own e-mail.
            .batch_size(1)
            .retry(FAST_RETRY),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["mailer"]).await;
    runner
        .wait_for(target, &["mailer"], WAIT)
        .await
        .expect("caught up");

    // At least once: the failed commit repeated that one e-mail; the inbox
    // still holds every event once.
    let counts = sent_counts(&outbox);
    assert_eq!(counts.len(), written.len());
    for (id, _) in &written {
        let expected = if *id == failing { 2 } else { 1 };
        assert_eq!(counts.get(id), Some(&expected), "e-mails for {id}");
    }
    let mut all: Vec<String> = written.iter().map(|(id, _)| id.to_string()).collect();
    all.sort();
    assert_eq!(inbox_ids(store.pool()).await, all);
    assert_eq!(deliveries.load(Ordering::SeqCst), written.len() + 1);
    assert!(runner
        .dead_letters("mailer")
        .await
        .expect("dead letters")
        .is_empty());

    // Redelivery of everything (a rebuild whose reset keeps the inbox): the
    // handler sees each event again, and sends nothing.
    head_reaches(&store, target).await;
    let mut progress = runner.rebuild("mailer").await.expect("rebuild");
    tokio::time::timeout(WAIT, async { while progress.changed().await.is_ok() {} })
        .await
        .expect("the rebuild finishes");
    runner
        .wait_for(target, &["mailer"], WAIT)
        .await
        .expect("replayed");
    assert_eq!(
        deliveries.load(Ordering::SeqCst),
        2 * written.len() + 1,
        "every event was handed to the handler again"
    );
    assert_eq!(sent_counts(&outbox), counts, "no e-mail went out twice");
    assert_eq!(inbox_ids(store.pool()).await, all);

    // A new event still gets its one e-mail.
    let committed = bus
        .execute("acc-0", BankCommand::Deposit { amount: 1 })
        .await
        .expect("deposit");
    runner
        .wait_for(committed.checkpoint().expect("written"), &["mailer"], WAIT)
        .await
        .expect("live");
    assert_eq!(
        sent_counts(&outbox).get(&committed.events[0].event_id),
        Some(&1)
    );

    shutdown.cancel();
    handle.await.expect("the runner stops");
}
