//! The memory store runs projections as PostgreSQL does.

use super::*;

// ---------------------------------------------------------------------------
// e. The in-memory backend

const POISON: i64 = 666;

/// A typed handler keeping its read model in memory: amounts by log position
/// (an upsert, so a retried batch does not count twice).
#[derive(Default)]
struct MemoryLedger {
    applied: Mutex<BTreeMap<u64, (String, i64)>>,
    calls: Mutex<HashMap<Uuid, usize>>,
    broken: AtomicBool,
}

struct MemoryLedgerHandler(Arc<MemoryLedger>);

#[async_trait]
impl EventHandler<BankAccount, MemoryStore> for MemoryLedgerHandler {
    fn name(&self) -> &str {
        "memory_ledger"
    }

    async fn handle(
        &self,
        event: &Envelope<BankAccount>,
        _tx: &mut MemoryTransaction,
    ) -> Result<(), HandlerError> {
        *self
            .0
            .calls
            .lock()
            .map_err(|_| HandlerError::msg("lock poisoned"))?
            .entry(event.event_id)
            .or_default() += 1;
        let amount = event.payload.balance_change();
        if amount == POISON && self.0.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::msg("memory ledger refuses 666"));
        }
        self.0
            .applied
            .lock()
            .map_err(|_| HandlerError::msg("lock poisoned"))?
            .insert(event.position, (event.aggregate_id.clone(), amount));
        Ok(())
    }
}

impl MemoryLedger {
    fn positions(&self) -> Vec<u64> {
        self.applied.lock().expect("lock").keys().copied().collect()
    }

    fn calls_of(&self, id: Uuid) -> usize {
        self.calls
            .lock()
            .expect("lock")
            .get(&id)
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_memory_store_runs_projections_like_postgres() {
    let store = MemoryStore::new();
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let counters = CommandBus::<Counter, _>::new(store.clone(), ());
    let mut written: Vec<Envelope<BankAccount>> = Vec::new();
    let mut others = Vec::new();
    for (id, command) in [
        ("acc-a", BankCommand::Open { owner: "A".into() }),
        ("acc-b", BankCommand::Open { owner: "B".into() }),
        ("acc-a", BankCommand::Deposit { amount: 10 }),
        ("acc-b", BankCommand::Deposit { amount: POISON }),
        ("acc-a", BankCommand::Deposit { amount: 11 }),
        ("acc-b", BankCommand::Withdraw { amount: 6 }),
        ("acc-a", BankCommand::Deposit { amount: 12 }),
    ] {
        written.extend(bus.execute(id, command).await.expect("command").events);
        others.extend(
            counters
                .execute("c-1", CounterCommand::Increment { by: 1 })
                .await
                .expect("counter")
                .events
                .into_iter()
                .map(|e| e.event_id),
        );
    }
    let poison = written
        .iter()
        .find(|e| e.payload == BankEvent::Deposited { amount: POISON })
        .expect("a poison event")
        .clone();
    let healthy: Vec<u64> = written
        .iter()
        .filter(|e| e.event_id != poison.event_id)
        .map(|e| e.position)
        .collect();

    let ledger = Arc::new(MemoryLedger::default());
    ledger.broken.store(true, Ordering::SeqCst);
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(typed::<BankAccount, MemoryStore, _>(MemoryLedgerHandler(
                ledger.clone(),
            )))
            .batch_size(4)
            .retry(FAST_RETRY)
            .on_error(OnError::Park),
        )
        .build()
        .expect("runner");
    // Catch-up past the poison event, which is parked. A wait begun before
    // the runner starts sees it parked on the way and says so; a wait begun
    // after it passed is plain.
    let target = written.last().expect("written").checkpoint();
    let waiting = tokio::spawn({
        let runner = runner.clone();
        async move { runner.wait_for(target, &["memory_ledger"], WAIT).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["memory_ledger"]).await;
    match waiting.await.expect("the wait") {
        Err(WaitError::Parked { event, .. }) => assert_eq!(event.position, Some(poison.position)),
        other => panic!("expected the parked event, got {other:?}"),
    }
    outflow::runner::wait_for(&store, target, &["memory_ledger"], WAIT)
        .await
        .expect("caught up");
    assert_eq!(ledger.positions(), healthy);
    let parked = runner
        .dead_letters("memory_ledger")
        .await
        .expect("dead letters");
    assert_eq!(parked.len(), 1, "{parked:#?}");
    assert_eq!(parked[0].event_id, poison.event_id);
    assert_eq!(parked[0].checkpoint, poison.checkpoint());
    assert_eq!(parked[0].event.aggregate_id, "acc-b");
    assert_eq!(parked[0].event.sequence, poison.sequence);
    assert_eq!(parked[0].event.position, Some(poison.position));
    assert_eq!(parked[0].event.event_type, "Deposited");
    assert_eq!(parked[0].error, "memory ledger refuses 666");
    assert!(parked[0].attempts >= 3, "{:?}", parked[0]);
    assert!(ledger.calls_of(poison.event_id) >= 3);
    // The typed handler only gets its aggregate's events.
    assert!(others.iter().all(|id| ledger.calls_of(*id) == 0));
    let status = common::wait_for_status(&runner, "memory_ledger", |s| {
        s.state == ProjectionState::Live
    })
    .await;
    assert_eq!(status.parked, 1);
    assert_eq!(status.lag_events, 0);

    // Live tail.
    let more = bus
        .execute("acc-b", BankCommand::Deposit { amount: 13 })
        .await
        .expect("deposit");
    runner
        .wait_for(
            more.checkpoint().expect("written"),
            &["memory_ledger"],
            WAIT,
        )
        .await
        .expect("live");
    assert_eq!(
        ledger
            .applied
            .lock()
            .expect("lock")
            .get(&more.events[0].position),
        Some(&("acc-b".to_owned(), 13))
    );

    // The parked event, retried after the fix.
    ledger.broken.store(false, Ordering::SeqCst);
    runner
        .retry_dead_letter("memory_ledger", parked[0].id)
        .await
        .expect("retry");
    assert!(runner
        .dead_letters("memory_ledger")
        .await
        .expect("dead letters")
        .is_empty());
    assert_eq!(
        ledger.applied.lock().expect("lock").get(&poison.position),
        Some(&("acc-b".to_owned(), POISON))
    );
    let total: i64 = ledger
        .applied
        .lock()
        .expect("lock")
        .values()
        .map(|(_, amount)| amount)
        .sum();
    assert_eq!(total, 10 + POISON + 11 - 6 + 12 + 13);

    // Without a runner, wait_for times out.
    shutdown.cancel();
    handle.await.expect("the runner stops");
    let late = bus
        .execute("acc-a", BankCommand::Deposit { amount: 1 })
        .await
        .expect("deposit");
    match runner
        .wait_for(
            late.checkpoint().expect("written"),
            &["memory_ledger"],
            Duration::from_millis(200),
        )
        .await
    {
        Err(WaitError::Timeout { projection, .. }) => assert_eq!(projection, "memory_ledger"),
        other => panic!("expected a timeout, got {other:?}"),
    }
}
