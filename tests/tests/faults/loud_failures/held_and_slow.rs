//! An open transaction named in status; a slow side effect that holds no
//! transaction.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_names_the_open_transaction_that_committed_events_wait_behind() {
    let db = common::TestDb::new("held_back").await;
    let store = db.store().await;
    let first = credit(&store, "wallet", "w", 0).await;
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Seen { name: "held" }))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["held"]).await;
    runner
        .wait_for(first.checkpoint(), &["held"], Duration::from_secs(20))
        .await
        .expect("the first event");

    // A transaction that took a transaction id, held open on purpose.
    let mut holder = store.pool().begin().await.expect("begin");
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .expect("pid");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await
        .expect("take a transaction id");
    // 100 appends commit after it.
    let mut last = first.clone();
    for version in 1..=100 {
        last = credit(&store, "wallet", "w", version).await;
    }

    let (status, _) = common::eventually(
        "status shows the lag and its holder",
        Duration::from_secs(20),
        || async {
            let status = common::status_of(&runner, "held").await;
            match &status.held_back_by {
                Some(tx) if tx.pid == holder_pid && status.lag_events == 100 => Ok(status),
                _ => Err(format!("{status:?}")),
            }
        },
    )
    .await;
    assert_eq!(seen(&store, "held").await.len(), 1, "{status:?}");
    assert!(status.lag > Duration::ZERO, "{status:?}");
    let tx = status.held_back_by.expect("holder");
    assert_eq!(tx.state.as_deref(), Some("idle in transaction"), "{tx:?}");
    assert!(tx.query_start.is_some(), "{tx:?}");
    // wait_for does not call it reached.
    assert!(matches!(
        runner
            .wait_for(last.checkpoint(), &["held"], Duration::from_millis(500))
            .await,
        Err(WaitError::Timeout { .. })
    ));

    // The holder stays open (3 s; 20 s with OUTFLOW_SOAK=1) while appends
    // go on: all along, status names it and counts every waiting event, and
    // nothing passes it.
    let hold = if std::env::var_os("OUTFLOW_SOAK").is_some() {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(3)
    };
    let held_since = std::time::Instant::now();
    let mut appended = 100u64;
    while held_since.elapsed() < hold {
        last = credit(&store, "wallet", "w", appended + 1).await;
        appended += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if appended.is_multiple_of(5) {
            let status = common::status_of(&runner, "held").await;
            assert_eq!(
                status.held_back_by.as_ref().map(|tx| tx.pid),
                Some(holder_pid),
                "{status:?}"
            );
            assert_eq!(status.lag_events, appended, "{status:?}");
            assert_eq!(seen(&store, "held").await.len(), 1, "{status:?}");
        }
    }

    holder.rollback().await.expect("end the holder");
    runner
        .wait_for(last.checkpoint(), &["held"], Duration::from_secs(20))
        .await
        .expect("caught up once the transaction ended");
    let delivered = seen(&store, "held").await;
    assert_eq!(delivered.len() as u64, appended + 1);
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "each once, in order"
    );
    let status = common::status_of(&runner, "held").await;
    assert_eq!(status.lag_events, 0, "{status:?}");
    assert!(status.held_back_by.is_none(), "{status:?}");
    common::stop_runner(shutdown, handle).await;
}

/// A side effect that waits until the test opens its gate.
struct SlowMail {
    entered: Arc<Notify>,
    gate: Arc<Notify>,
    sent: Arc<Mutex<Vec<Uuid>>>,
}

#[async_trait]
impl Projection<PostgresStore> for SlowMail {
    fn name(&self) -> &str {
        "mail"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["mailbox"])
    }

    async fn effects(&self, events: &[RecordedEvent]) -> Result<(), HandlerError> {
        self.entered.notify_one();
        self.gate.notified().await;
        let mut sent = self
            .sent
            .lock()
            .map_err(|_| HandlerError::msg("poisoned"))?;
        sent.extend(events.iter().map(|e| e.event_id));
        Ok(())
    }

    async fn handle(
        &self,
        _events: &[RecordedEvent],
        _tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_side_effect_holds_no_transaction_and_delays_no_other_projection() {
    let db = common::TestDb::new("slow_effect").await;
    let store = db.store().await;
    let entered = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(SlowMail {
            entered: entered.clone(),
            gate: gate.clone(),
            sent: sent.clone(),
        }))
        .projection(ProjectionOptions::new(Seen { name: "other" }))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);

    let mail = credit(&store, "mailbox", "m", 0).await;
    tokio::time::timeout(Duration::from_secs(20), entered.notified())
        .await
        .expect("the effect started");
    // The effect is in progress (and stays so until the gate opens): a later
    // event of another projection is handled meanwhile.
    let wallet = credit(&store, "wallet", "w", 0).await;
    runner
        .wait_for(wallet.checkpoint(), &["other"], Duration::from_secs(20))
        .await
        .expect("the other projection is not held back by the effect");
    let status = common::status_of(&runner, "other").await;
    assert!(status.held_back_by.is_none(), "{status:?}");
    assert!(sent.lock().expect("lock").is_empty(), "the gate is closed");

    gate.notify_one();
    runner
        .wait_for(mail.checkpoint(), &["mail"], Duration::from_secs(20))
        .await
        .expect("the mail projection finishes once its effect returns");
    assert_eq!(*sent.lock().expect("lock"), vec![mail.event_id]);
    common::stop_runner(shutdown, handle).await;
}
