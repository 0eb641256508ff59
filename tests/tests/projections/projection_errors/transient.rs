//! Transient failures retried without limit, never parked.

use super::*;

/// How [`Flaky`] fails.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// `sqlx::Error::PoolTimedOut`, converted by `?`.
    Sqlx,
    /// `StoreError::Database` around `PoolTimedOut`.
    Store,
    /// An application error whose cause is `PoolTimedOut`.
    Wrapped,
    /// A plain message: not the infrastructure's fault.
    Plain,
}

#[derive(Debug)]
struct Wrapped(sqlx::Error);

impl fmt::Display for Wrapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("could not reach the read model")
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn failure(kind: Failure) -> HandlerError {
    match kind {
        Failure::Sqlx => sqlx::Error::PoolTimedOut.into(),
        Failure::Store => outflow::StoreError::Database {
            operation: "writing the read model",
            kind: outflow::ErrorKind::Transient,
            source: Box::new(sqlx::Error::PoolTimedOut),
        }
        .into(),
        Failure::Wrapped => Wrapped(sqlx::Error::PoolTimedOut).into(),
        Failure::Plain => HandlerError::msg("the read model said no"),
    }
}

/// Fails its first `failures` calls, then writes one row per event.
struct Flaky {
    name: String,
    kind: Failure,
    failures: AtomicUsize,
    calls: Arc<AtomicUsize>,
}

#[async_trait]
impl Projection<PostgresStore> for Flaky {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(failure(self.kind));
        }
        for event in events {
            insert_row(&self.name, event, 0, tx).await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_are_retried_without_limit_and_never_park() {
    let db = common::TestDb::new("transient").await;
    let store = db.store().await;
    // The classification the runner relies on: the backend classifies its
    // driver's errors, wherever they sit in the chain.
    let classify = |e: &(dyn std::error::Error + 'static)| store.classify(e);
    for kind in [Failure::Sqlx, Failure::Store, Failure::Wrapped] {
        assert_eq!(
            failure(kind).kind_with(classify),
            ErrorKind::Transient,
            "{kind:?}"
        );
    }
    assert_eq!(failure(Failure::Plain).kind_with(classify), ErrorKind::Data);
    assert_eq!(
        HandlerError::from(sqlx::Error::RowNotFound).kind_with(classify),
        ErrorKind::Data
    );
    let missing_table = sqlx::query("SELECT * FROM no_such_table")
        .execute(store.pool())
        .await
        .expect_err("no such table");
    assert_eq!(
        HandlerError::from(missing_table).kind_with(classify),
        ErrorKind::Infrastructure
    );
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let mut written = Vec::new();
    for i in 0..5 {
        let id = format!("acc-{i}");
        execute(
            &bus,
            &mut written,
            &id,
            BankCommand::Open {
                owner: format!("owner {i}"),
            },
        )
        .await;
        execute(&bus, &mut written, &id, BankCommand::Deposit { amount: 7 }).await;
    }
    let head = last(&written);

    // Each fails its first 8 calls; 3 attempts are allowed before parking.
    const FAILURES: usize = 8;
    let mut builder = runner_builder(&store);
    let mut calls = Vec::new();
    for (name, kind) in [
        ("flaky_sqlx", Failure::Sqlx),
        ("flaky_store", Failure::Store),
        ("flaky_wrapped", Failure::Wrapped),
        ("flaky_plain", Failure::Plain),
    ] {
        create_ledger_table(store.pool(), name).await;
        let counter = Arc::new(AtomicUsize::new(0));
        calls.push((name, counter.clone()));
        builder = builder.projection(
            ProjectionOptions::new(Flaky {
                name: name.to_owned(),
                kind,
                failures: AtomicUsize::new(FAILURES),
                calls: counter,
            })
            .batch_size(100)
            .retry(FAST_RETRY)
            .on_error(OnError::Park),
        );
    }
    let runner = builder.build().expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(
        &runner,
        &["flaky_sqlx", "flaky_store", "flaky_wrapped", "flaky_plain"],
    )
    .await;
    // Only the plain handler's errors are the data's fault: its events are
    // parked, and a wait that sees that happen says so (one begun after it
    // happened does not: the parked events are older than the wait).
    match runner
        .wait_for(
            head,
            &["flaky_sqlx", "flaky_store", "flaky_wrapped", "flaky_plain"],
            WAIT,
        )
        .await
    {
        Err(WaitError::Parked { projection, .. }) => assert_eq!(projection, "flaky_plain"),
        Ok(()) => {}
        Err(other) => panic!("expected flaky_plain's parked events, got {other:?}"),
    }
    runner
        .wait_for(
            head,
            &["flaky_sqlx", "flaky_store", "flaky_wrapped", "flaky_plain"],
            WAIT,
        )
        .await
        .expect("every projection gets through");

    for (name, counter) in &calls[..3] {
        assert_eq!(
            ledger_ids(store.pool(), name).await,
            ids(&written),
            "{name}: every event applied once"
        );
        assert!(
            runner
                .dead_letters(name)
                .await
                .expect("dead letters")
                .is_empty(),
            "{name} parked an event on a transient failure"
        );
        assert!(
            counter.load(Ordering::SeqCst) > FAILURES,
            "{name}: retried past max_attempts until it succeeded"
        );
        let status = common::status_of(&runner, name).await;
        assert_eq!(status.parked, 0, "{status:?}");
    }

    // The same failures, not transient, park: 3 attempts on the batch, 3 on
    // its first event alone, and that event is given up on.
    let parked = runner
        .dead_letters("flaky_plain")
        .await
        .expect("dead letters");
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert_eq!(parked[0].event_id, written[0].event_id);
    assert_eq!(parked[0].error, "the read model said no");
    assert_eq!(
        ledger_ids(store.pool(), "flaky_plain").await,
        ids(&written[1..])
    );

    shutdown.cancel();
    handle.await.expect("the runner stops");
}
