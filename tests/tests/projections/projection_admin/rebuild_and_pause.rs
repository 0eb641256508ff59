//! A rebuild with its progress, and a pause that applies nothing until resumed.

use super::*;

// ---------------------------------------------------------------------------
// a. Rebuild with progress

/// `Balances`, with a gate: each batch takes one permit, and waits while
/// there is none. Lets the test hold a rebuild half-way.
struct Gated {
    inner: Balances,
    permits: Arc<AtomicI64>,
    waiting: Arc<AtomicBool>,
}

#[async_trait]
impl Projection<PostgresStore> for Gated {
    fn name(&self) -> &str {
        Projection::<PostgresStore>::name(&self.inner)
    }

    fn filter(&self) -> LogFilter {
        self.inner.filter()
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        while self
            .permits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n > 0).then_some(n - 1)
            })
            .is_err()
        {
            self.waiting.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.waiting.store(false, Ordering::SeqCst);
        self.inner.handle(events, tx).await
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        self.inner.reset(tx).await
    }
}

const ACCOUNTS: usize = 20;
const ROUNDS: usize = 3;
const PER_APPEND: usize = 50;
const ACCOUNT_EVENTS: usize = ACCOUNTS * ROUNDS * PER_APPEND;

fn events_for(account: usize, round: usize) -> Vec<BankEvent> {
    (0..PER_APPEND)
        .map(|i| {
            if round == 0 && i == 0 {
                BankEvent::AccountOpened {
                    owner: format!("owner-{account}"),
                }
            } else if matches!((i + account) % 5, 0) {
                BankEvent::Withdrawn { amount: 2 }
            } else {
                BankEvent::Deposited {
                    amount: (i % 11 + 1) as i64,
                }
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_reports_progress_and_ends_with_the_same_read_model() {
    let db = common::TestDb::new("admin_rebuild").await;
    let store = db.store().await;
    Balances::create_table(store.pool()).await.expect("table");

    // 3000 account events, and counter events the projection does not want.
    let mut expected: BTreeMap<String, BalanceRow> = BTreeMap::new();
    let mut target = Checkpoint::START;
    for round in 0..ROUNDS {
        for account in 0..ACCOUNTS {
            let id = format!("acc-{account:02}");
            let events = events_for(account, round);
            Balances::fold(&events, &id, expected.entry(id.clone()).or_default());
            let written = store
                .append(AppendRequest {
                    aggregate_type: "account".into(),
                    aggregate_id: id.clone(),
                    expected_version: (round * PER_APPEND) as u64,
                    events: events
                        .iter()
                        .map(|e| NewEvent::from_event::<BankAccount>(&id, e).expect("serialize"))
                        .collect(),
                })
                .await
                .expect("append");
            target = written.last().expect("written").checkpoint();
        }
        store
            .append(AppendRequest {
                aggregate_type: "counter".into(),
                aggregate_id: "c-1".into(),
                expected_version: (round * 10) as u64,
                events: (0..10)
                    .map(|_| {
                        NewEvent::from_event::<Counter>("c-1", &CounterEvent::Incremented { by: 1 })
                            .expect("serialize")
                    })
                    .collect(),
            })
            .await
            .expect("append counter events");
    }
    let expected: Vec<BalanceRow> = expected.into_values().collect();

    let permits = Arc::new(AtomicI64::new(i64::MAX));
    let waiting = Arc::new(AtomicBool::new(false));
    let runner = runner_builder(&store)
        .projection(
            ProjectionOptions::new(Gated {
                inner: Balances::new(),
                permits: permits.clone(),
                waiting: waiting.clone(),
            })
            .batch_size(250),
        )
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_balances"]).await;
    runner
        .wait_for(target, &["account_balances"], WAIT)
        .await
        .expect("caught up");
    assert_eq!(Balances::rows(store.pool()).await.expect("rows"), expected);

    // Spoil the read model: the rebuild's reset must wipe it.
    sqlx::query("UPDATE account_balances SET balance = balance + 1000, events = 0")
        .execute(store.pool())
        .await
        .expect("spoil the table");
    assert_ne!(Balances::rows(store.pool()).await.expect("rows"), expected);

    // Hold the replay after three batches.
    head_reaches(&store, target).await;
    permits.store(3, Ordering::SeqCst);
    let mut progress = runner.rebuild("account_balances").await.expect("rebuild");
    assert_eq!(
        *progress.borrow(),
        RebuildProgress {
            done: 0,
            total: ACCOUNT_EVENTS as u64
        },
        "the total counts the account events only"
    );
    // Once the gate holds the fourth batch, nothing more can commit: only
    // then is a status read comparable with the table.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !waiting.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay never reached the gate"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held = common::wait_for_status(&runner, "account_balances", |s| {
        s.rebuild.is_some_and(|p| p.done > 0)
    })
    .await;
    let mid = held.rebuild.expect("progress while rebuilding");
    assert!(mid.done > 0 && mid.done < mid.total, "{mid:?}");
    assert_eq!(mid.total, ACCOUNT_EVENTS as u64);
    assert_eq!(held.processed, mid.done);
    assert!(held.lag_events > 0, "{held:?}");
    // The read model holds exactly the events counted as done.
    let applied: i64 = Balances::rows(store.pool())
        .await
        .expect("rows")
        .iter()
        .map(|r| r.events)
        .sum();
    assert_eq!(u64::try_from(applied).expect("positive"), mid.done);
    // The receiver reports the same progress.
    let deadline = tokio::time::Instant::now() + WAIT;
    while *progress.borrow() != mid {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the receiver shows {:?}, the status {mid:?}",
            *progress.borrow()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Let it finish; the receiver goes up to done == total, then closes.
    permits.store(i64::MAX, Ordering::SeqCst);
    let mut seen = vec![*progress.borrow_and_update()];
    tokio::time::timeout(WAIT, async {
        while progress.changed().await.is_ok() {
            seen.push(*progress.borrow_and_update());
        }
    })
    .await
    .expect("the rebuild finishes");
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done), "{seen:?}");
    assert!(seen.iter().all(|p| p.total == ACCOUNT_EVENTS as u64));
    assert_eq!(
        seen.last().copied(),
        Some(RebuildProgress {
            done: ACCOUNT_EVENTS as u64,
            total: ACCOUNT_EVENTS as u64
        })
    );
    runner
        .wait_for(target, &["account_balances"], WAIT)
        .await
        .expect("rebuilt");
    assert_eq!(Balances::rows(store.pool()).await.expect("rows"), expected);
    let status = common::wait_for_status(&runner, "account_balances", |s| {
        s.state == ProjectionState::Live
    })
    .await;
    assert_eq!(status.rebuild, None, "{status:?}");
    assert_eq!(status.processed, ACCOUNT_EVENTS as u64);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}

// ---------------------------------------------------------------------------
// b. Pause and resume

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_projection_applies_nothing_until_resumed() {
    let db = common::TestDb::new("admin_pause").await;
    let store = db.store().await;
    Balances::create_table(store.pool()).await.expect("table");
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    bus.execute(
        "acc-1",
        BankCommand::Open {
            owner: "Ann".into(),
        },
    )
    .await
    .expect("open");
    let deposit = bus
        .execute("acc-1", BankCommand::Deposit { amount: 10 })
        .await
        .expect("deposit");

    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Balances::new()))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    common::started(&runner, &["account_balances"]).await;
    runner
        .wait_for(
            deposit.checkpoint().expect("written"),
            &["account_balances"],
            WAIT,
        )
        .await
        .expect("caught up");
    assert_eq!(balance_of(store.pool(), "acc-1").await, Some(10));

    runner.pause("account_balances").await.expect("pause");
    // The pause reaches the worker within a heartbeat; it then records it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let units = store.units(Some("account_balances")).await.expect("units");
        if units.iter().all(|u| u.state == ProjectionState::Paused) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never paused: {units:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let held = bus
        .execute("acc-1", BankCommand::Deposit { amount: 5 })
        .await
        .expect("deposit while paused");
    let held_at = held.checkpoint().expect("written");
    // Over a second, nothing of it is applied.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(balance_of(store.pool(), "acc-1").await, Some(10));
        let status = runner.status().await.expect("status");
        assert_eq!(status[0].state, ProjectionState::Paused, "{status:?}");
        assert!(status[0].paused);
        assert!(status[0].checkpoint < held_at, "{status:?}");
    }
    head_reaches(&store, held_at).await;
    let status = runner.status().await.expect("status");
    assert_eq!(status[0].lag_events, 1, "{status:?}");
    match runner
        .wait_for(held_at, &["account_balances"], Duration::from_millis(200))
        .await
    {
        Err(WaitError::Timeout { projection, .. }) => assert_eq!(projection, "account_balances"),
        other => panic!("expected a timeout while paused, got {other:?}"),
    }

    runner.resume("account_balances").await.expect("resume");
    runner
        .wait_for(held_at, &["account_balances"], WAIT)
        .await
        .expect("resumed");
    assert_eq!(balance_of(store.pool(), "acc-1").await, Some(15));
    let status = common::wait_for_status(&runner, "account_balances", |s| {
        s.state == ProjectionState::Live
    })
    .await;
    assert!(!status.paused);

    shutdown.cancel();
    handle.await.expect("the runner stops");
}
