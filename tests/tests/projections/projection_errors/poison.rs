//! A poison event retried, parked and skipped, then retried or discarded; a
//! projection that stops on error.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_retried_parked_and_skipped_then_retried_or_discarded() {
    let db = common::TestDb::new("poison_park").await;
    let store = db.store().await;
    create_ledger_table(store.pool(), "ledger").await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());

    // Three poison deposits among healthy events, all in the log before the
    // runner starts: the first batch holds them all.
    let mut written = Vec::new();
    for (id, command) in [
        ("acc-a", BankCommand::Open { owner: "A".into() }),
        ("acc-b", BankCommand::Open { owner: "B".into() }),
        ("acc-a", BankCommand::Deposit { amount: 10 }),
        ("acc-b", BankCommand::Deposit { amount: 20 }),
        ("acc-a", BankCommand::Deposit { amount: POISON }),
        ("acc-a", BankCommand::Deposit { amount: 11 }),
        ("acc-b", BankCommand::Deposit { amount: POISON }),
        ("acc-b", BankCommand::Deposit { amount: 21 }),
        ("acc-a", BankCommand::Withdraw { amount: 5 }),
        ("acc-a", BankCommand::Deposit { amount: POISON }),
        ("acc-a", BankCommand::Deposit { amount: 12 }),
        ("acc-b", BankCommand::Deposit { amount: 22 }),
    ] {
        execute(&bus, &mut written, id, command).await;
    }
    let poison: Vec<Written> = written.iter().filter(|w| w.is_poison()).cloned().collect();
    let healthy: Vec<Written> = written.iter().filter(|w| !w.is_poison()).cloned().collect();
    assert_eq!(poison.len(), 3);
    let head = last(&written);

    let ledger = Ledger::new("ledger", "ledger");
    let broken = ledger.broken.clone();
    let calls = ledger.calls.clone();
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(ledger)
                .batch_size(100)
                .retry(FAST_RETRY)
                .on_error(OnError::Park),
        )
        .build()
        .expect("runner");
    // A wait begun before the runner starts sees every poison event parked
    // on the way, and reports the first...
    let waiting = tokio::spawn({
        let runner = runner.clone();
        async move { runner.wait_for(head, &["ledger"], WAIT).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["ledger"]).await;
    match waiting.await.expect("the wait") {
        Err(WaitError::Parked {
            projection, event, ..
        }) => {
            assert_eq!(projection, "ledger");
            assert!(
                poison.iter().any(|p| Some(p.position) == event.position),
                "{event:?} is not a poison event"
            );
        }
        other => panic!("expected a parked event, got {other:?}"),
    }
    // ...and one begun once the projection is past them succeeds.
    runner
        .wait_for(head, &["ledger"], WAIT)
        .await
        .expect("the projection gets past the poison events");

    // The events after each poison one are applied, the poison ones are not.
    assert_eq!(ledger_ids(store.pool(), "ledger").await, ids(&healthy));

    // Each poison event is parked with its error chain, attempts and reference.
    let parked = runner.dead_letters("ledger").await.expect("dead letters");
    assert_eq!(parked.len(), 3, "{parked:#?}");
    for (dead, event) in parked.iter().zip(&poison) {
        assert_eq!(dead.unit.projection, "ledger");
        assert_eq!(dead.event_id, event.event_id);
        assert_eq!(dead.checkpoint, event.checkpoint);
        assert_eq!(dead.event.aggregate_type, "account");
        assert_eq!(dead.event.aggregate_id, event.aggregate_id);
        assert_eq!(dead.event.sequence, event.sequence);
        assert_eq!(dead.event.position, Some(event.position));
        assert_eq!(dead.event.event_type, "Deposited");
        assert_eq!(dead.event.event_version, "1.0");
        assert_eq!(dead.error, REFUSAL);
        assert!(dead.attempts >= 3, "{dead:?}");
        assert!(dead.first_failed_at <= dead.last_failed_at, "{dead:?}");
        assert!(
            calls_of(&calls, event.event_id) >= 3,
            "the handler saw {} only {} times",
            event.event_id,
            calls_of(&calls, event.event_id)
        );
    }
    let status = common::status_of(&runner, "ledger").await;
    assert_eq!(status.parked, 3, "{status:?}");
    assert!(status.checkpoint >= head, "{status:?}");
    assert_eq!(status.lag_events, 0, "{status:?}");

    // Retrying while the handler is still broken fails and counts the attempt.
    let first = parked[0].clone();
    match runner.retry_dead_letter("ledger", first.id).await {
        Err(RetryError::Handler(error)) => assert_eq!(error.chain(), REFUSAL),
        other => panic!("expected RetryError::Handler, got {other:?}"),
    }
    let after = runner.dead_letters("ledger").await.expect("dead letters");
    assert_eq!(after.len(), 3);
    assert_eq!(after[0].id, first.id);
    assert_eq!(after[0].attempts, first.attempts + 1);
    assert_eq!(after[0].error, REFUSAL);
    assert!(after[0].last_failed_at >= first.last_failed_at);
    assert_eq!(ledger_ids(store.pool(), "ledger").await, ids(&healthy));

    // An unknown id is refused.
    let unknown = parked.iter().map(|d| d.id).max().expect("ids") + 1000;
    match runner.retry_dead_letter("ledger", unknown).await {
        Err(RetryError::NotFound { projection, id }) => {
            assert_eq!((projection.as_str(), id), ("ledger", unknown));
        }
        other => panic!("expected RetryError::NotFound, got {other:?}"),
    }

    // Discarding drops one dead letter without applying it.
    assert!(runner
        .discard_dead_letter(parked[1].id)
        .await
        .expect("discard"));
    assert!(!runner
        .discard_dead_letter(parked[1].id)
        .await
        .expect("discard again"));
    let after: Vec<u64> = runner
        .dead_letters("ledger")
        .await
        .expect("dead letters")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(after, vec![parked[0].id, parked[2].id]);
    assert_eq!(common::status_of(&runner, "ledger").await.parked, 2);

    // After the fix, a retry applies the event and removes its dead letter.
    broken.store(false, Ordering::SeqCst);
    runner
        .retry_dead_letter("ledger", parked[0].id)
        .await
        .expect("the retry succeeds after the fix");
    let after: Vec<u64> = runner
        .dead_letters("ledger")
        .await
        .expect("dead letters")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(after, vec![parked[2].id]);
    let (succeeded, failed) = runner
        .retry_dead_letters("ledger")
        .await
        .expect("retry all");
    assert_eq!(succeeded, 1);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(runner
        .dead_letters("ledger")
        .await
        .expect("dead letters")
        .is_empty());
    assert_eq!(common::status_of(&runner, "ledger").await.parked, 0);

    // Every event but the discarded one is in the read model, exactly once.
    let expected: Vec<Uuid> = written
        .iter()
        .filter(|w| w.event_id != poison[1].event_id)
        .map(|w| w.event_id)
        .collect();
    assert_eq!(ledger_ids(store.pool(), "ledger").await, expected);

    // New events still flow after all this.
    let mut more = Vec::new();
    execute(
        &bus,
        &mut more,
        "acc-b",
        BankCommand::Deposit { amount: 23 },
    )
    .await;
    runner
        .wait_for(more[0].checkpoint, &["ledger"], WAIT)
        .await
        .expect("live again");
    let rows = ledger_ids(store.pool(), "ledger").await;
    assert_eq!(rows.last(), Some(&more[0].event_id));
    assert_eq!(rows.len(), expected.len() + 1);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_error_stop_halts_only_that_projection_until_restarted() {
    let db = common::TestDb::new("poison_stop").await;
    let store = db.store().await;
    create_ledger_table(store.pool(), "ledger_stop").await;
    create_ledger_table(store.pool(), "ledger_live").await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());

    let mut written = Vec::new();
    for (id, command) in [
        ("acc-a", BankCommand::Open { owner: "A".into() }),
        ("acc-a", BankCommand::Deposit { amount: 1 }),
        ("acc-b", BankCommand::Open { owner: "B".into() }),
        ("acc-a", BankCommand::Deposit { amount: 2 }),
        ("acc-b", BankCommand::Deposit { amount: POISON }),
        ("acc-a", BankCommand::Deposit { amount: 3 }),
        ("acc-b", BankCommand::Deposit { amount: 4 }),
    ] {
        execute(&bus, &mut written, id, command).await;
    }
    let poison_at = written
        .iter()
        .position(Written::is_poison)
        .expect("a poison event");
    let poison = written[poison_at].clone();

    let stopping = Ledger::new("ledger_stop", "ledger_stop");
    let broken = stopping.broken.clone();
    let calls = stopping.calls.clone();
    let healthy = Ledger::new("ledger_live", "ledger_live");
    healthy.broken.store(false, Ordering::SeqCst);
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(stopping)
                .batch_size(100)
                .retry(FAST_RETRY)
                .on_error(OnError::Stop),
        )
        .projection(
            ProjectionOptions::new(healthy)
                .batch_size(100)
                .retry(FAST_RETRY)
                .on_error(OnError::Stop),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);

    // The projection stops at the poison event, with that event in its error.
    let status = common::wait_for_status(&runner, "ledger_stop", |s| {
        s.state == ProjectionState::Stopped
    })
    .await;
    let error = status
        .last_error
        .clone()
        .expect("a stopped unit has an error");
    let event_ref = store
        .read_log(written[poison_at - 1].checkpoint, &LogFilter::all(), 1)
        .await
        .expect("read the poison event")
        .first()
        .expect("the poison event")
        .event_ref();
    assert_eq!(event_ref.position, Some(poison.position));
    assert!(
        error.contains(&event_ref.to_string()) && error.contains(REFUSAL),
        "{error}"
    );
    assert_eq!(
        status.checkpoint,
        written[poison_at - 1].checkpoint,
        "stopped right before the poison event"
    );
    assert!(calls_of(&calls, poison.event_id) >= 3);
    assert_eq!(
        ledger_ids(store.pool(), "ledger_stop").await,
        ids(&written[..poison_at])
    );
    assert!(runner
        .dead_letters("ledger_stop")
        .await
        .expect("dead letters")
        .is_empty());

    // wait_for reports the stop instead of running into its timeout.
    let head = last(&written);
    match runner.wait_for(head, &["ledger_stop"], WAIT).await {
        Err(WaitError::Stopped { projection, error }) => {
            assert_eq!(projection, "ledger_stop");
            assert!(error.contains(REFUSAL), "{error}");
        }
        other => panic!("expected WaitError::Stopped, got {other:?}"),
    }

    // The other projection of the same runner goes on, live.
    runner
        .wait_for(head, &["ledger_live"], WAIT)
        .await
        .expect("the healthy projection catches up");
    execute(
        &bus,
        &mut written,
        "acc-a",
        BankCommand::Deposit { amount: 5 },
    )
    .await;
    execute(
        &bus,
        &mut written,
        "acc-b",
        BankCommand::Withdraw { amount: 4 },
    )
    .await;
    let head = last(&written);
    runner
        .wait_for(head, &["ledger_live"], WAIT)
        .await
        .expect("the healthy projection follows new events");
    assert_eq!(ledger_ids(store.pool(), "ledger_live").await, ids(&written));
    let status = common::status_of(&runner, "ledger_stop").await;
    assert_eq!(status.state, ProjectionState::Stopped);
    assert_eq!(status.checkpoint, written[poison_at - 1].checkpoint);
    assert_eq!(
        ledger_ids(store.pool(), "ledger_stop").await,
        ids(&written[..poison_at])
    );
    match runner
        .wait_for(head, &["ledger_live", "ledger_stop"], WAIT)
        .await
    {
        Err(WaitError::Stopped { projection, .. }) => assert_eq!(projection, "ledger_stop"),
        other => panic!("expected WaitError::Stopped, got {other:?}"),
    }

    // After the fix and a restart it resumes at the poison event: every event
    // exactly once, in log order.
    broken.store(false, Ordering::SeqCst);
    runner.restart("ledger_stop").await.expect("restart");
    runner
        .wait_for(head, &["ledger_stop"], WAIT)
        .await
        .expect("the restarted projection catches up");
    assert_eq!(ledger_ids(store.pool(), "ledger_stop").await, ids(&written));
    let status =
        common::wait_for_status(&runner, "ledger_stop", |s| s.state == ProjectionState::Live).await;
    assert_eq!(status.last_error, None);
    assert_eq!(status.parked, 0);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}
