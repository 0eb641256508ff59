//! State live as soon as wait_for returns, setup and rebuild hand-over, views
//! and queries, metadata and error messages.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_state_is_live_as_soon_as_wait_for_returns() {
    let db = common::TestDb::new("state_after_batch").await;
    let store = db.store().await;
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(Seen { name: "state" }))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    for version in 0..16 {
        let event = credit(&store, "wallet", "w", version).await;
        runner
            .wait_for(event.checkpoint(), &["state"], Duration::from_secs(20))
            .await
            .expect("wait");
        let status = common::status_of(&runner, "state").await;
        assert_eq!(
            status.state,
            ProjectionState::Live,
            "read {version}: {status:?}"
        );
    }
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn setup_creates_the_read_model_and_a_rebuild_hands_over_without_waiting_for_a_heartbeat() {
    let db = common::TestDb::new("setup_rebuild").await;
    let store = db.store().await;
    let mut last = None;
    for version in 0..4 {
        last = Some(credit(&store, "wallet", "w", version).await);
    }
    let last = last.expect("events");
    // Heartbeats far apart: a handover that waited for one would take 30 s.
    let runner = ProjectionRunner::builder(store.clone())
        .heartbeat_interval(Duration::from_secs(30))
        .lease_ttl(Duration::from_secs(90))
        .projection(ProjectionOptions::new(Seen { name: "setup" }))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    // The table did not exist: setup created it before the first batch.
    runner
        .wait_for(last.checkpoint(), &["setup"], Duration::from_secs(20))
        .await
        .expect("caught up");
    assert_eq!(seen(&store, "setup").await.len(), 4);

    // Someone drops the read model; a rebuild sets it up again and refills it.
    sqlx::query("DROP TABLE seen_setup")
        .execute(store.pool())
        .await
        .expect("drop");
    let mut progress = runner.rebuild("setup").await.expect("rebuild starts");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !progress.borrow().is_complete() {
            progress.changed().await.expect("progress");
        }
    })
    .await
    .expect("the rebuild completes without waiting for the next heartbeat");
    runner
        .wait_for(last.checkpoint(), &["setup"], Duration::from_secs(10))
        .await
        .expect("rebuilt");
    assert_eq!(seen(&store, "setup").await.len(), 4);
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_query_handle_reads_its_writes() {
    let db = common::TestDb::new("view_query").await;
    let store = db.store().await;
    let view = ViewProjection::<BankAccount, AccountView>::new("account_view", "account_view")
        .expect("view");
    // The handle outlives the projection's move into the runner, and clones.
    let query = view.query(&store).clone();
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(view))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    bus.execute(
        "acc-1",
        BankCommand::Open {
            owner: "ann".into(),
        },
    )
    .await
    .expect("open");
    let done = bus
        .execute("acc-1", BankCommand::Deposit { amount: 250 })
        .await
        .expect("deposit");
    let view = query
        .load_after(done.checkpoint(), "acc-1", Duration::from_secs(20))
        .await
        .expect("read after the deposit")
        .expect("the view exists");
    assert_eq!((view.owner.as_str(), view.balance), ("ann", 250));
    assert_eq!(query.load("nobody").await.expect("load"), None);
    common::stop_runner(shutdown, handle).await;
}

/// One dispatch: the aggregate id and the sequences of its events.
type Dispatch = (String, Vec<usize>);

/// Records each dispatch.
#[derive(Clone, Default)]
struct Dispatches(Arc<Mutex<Vec<Dispatch>>>);

#[async_trait]
impl Query<BankAccount> for Dispatches {
    async fn dispatch(&self, aggregate_id: &str, events: &[EventEnvelope<BankAccount>]) {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((
                aggregate_id.to_owned(),
                events.iter().map(|e| e.sequence).collect(),
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cqrs_es_query_runs_as_a_projection_once_per_command() {
    let db = common::TestDb::new("cqrs_query").await;
    let store = db.store().await;
    let event = |payload: BankEvent| NewEvent {
        event_id: Uuid::now_v7(),
        event_type: cqrs_es::DomainEvent::event_type(&payload),
        event_version: "1.0".into(),
        payload: serde_json::to_value(&payload).expect("json"),
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    };
    // Two events in one command, then one each on two accounts.
    store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "a".into(),
            expected_version: 0,
            events: vec![
                event(BankEvent::AccountOpened {
                    owner: "ann".into(),
                }),
                event(BankEvent::Deposited { amount: 5 }),
            ],
        })
        .await
        .expect("append");
    store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "b".into(),
            expected_version: 0,
            events: vec![event(BankEvent::AccountOpened {
                owner: "bob".into(),
            })],
        })
        .await
        .expect("append");
    let last = store
        .append(AppendRequest {
            aggregate_type: "account".into(),
            aggregate_id: "a".into(),
            expected_version: 2,
            events: vec![event(BankEvent::Withdrawn { amount: 5 })],
        })
        .await
        .expect("append");
    let dispatches = Dispatches::default();
    let runner = runner_builder(&store)
        .projection(ProjectionOptions::new(QueryProjection::new(
            "audit",
            dispatches.clone(),
        )))
        .build()
        .expect("runner");
    let (shutdown, handle) = common::start_runner(&runner);
    runner
        .wait_for(last[0].checkpoint(), &["audit"], Duration::from_secs(20))
        .await
        .expect("dispatched");
    let seen = dispatches.0.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![
            ("a".to_owned(), vec![1, 2]),
            ("b".to_owned(), vec![1]),
            ("a".to_owned(), vec![3]),
        ]
    );
    common::stop_runner(shutdown, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_written_and_errors_print_each_message_once() {
    let db = common::TestDb::new("metadata_errors").await;
    let store = db.store().await;
    let bus = CommandBus::<BankAccount, _>::new(store.clone(), ());
    let metadata = HashMap::from([("user".to_owned(), "ann".to_owned())]);
    let done = bus
        .execute_with_metadata(
            "acc",
            BankCommand::Open {
                owner: "ann".into(),
            },
            metadata.clone(),
        )
        .await
        .expect("open");
    assert_eq!(done.events[0].metadata, metadata);
    let stored = store
        .read_stream("account", "acc", 0, 10)
        .await
        .expect("read");
    assert_eq!(stored[0].metadata, metadata);

    // A rejection: the aggregate's message appears once in the chain.
    let rejected = bus
        .execute("acc", BankCommand::Withdraw { amount: 5 })
        .await
        .expect_err("insufficient funds");
    assert!(matches!(rejected, CommandError::Rejected(_)));
    let chain = error_chain(&rejected);
    assert_eq!(chain.matches("insufficient funds").count(), 1, "{chain}");
    let with_anyhow = format!("{:#}", anyhow::Error::from(rejected));
    assert_eq!(
        with_anyhow.matches("insufficient funds").count(),
        1,
        "{with_anyhow}"
    );

    // A database error: the driver's message appears once.
    let error = sqlx::query("SELECT * FROM no_such_table")
        .execute(store.pool())
        .await
        .expect_err("no table");
    let wrapped = StoreError::database("reading", outflow::ErrorKind::Infrastructure, error);
    let chain = error_chain(&wrapped);
    assert_eq!(chain.matches("no_such_table").count(), 1, "{chain}");
}
