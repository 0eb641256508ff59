//! Partitions projected into PostgreSQL and into SQLite.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_partitions_projected_into_postgres() {
    let js = common::jetstream_store(&common::nats_url(), "pg_projection", 4).await;
    let db = common::TestDb::new("jetstream_projection").await;
    let read_models = db.store().await;
    Balances::create_table(read_models.pool())
        .await
        .expect("create account_balances");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(js.clone(), ()));
    open_shared(&bus).await;

    // A projection asking for a partition count the log does not have is
    // refused; the default follows the store's 4.
    let log: Arc<dyn EventLog> = Arc::new(js.clone());
    let refused = ProjectionRunner::with_log(log.clone(), read_models.clone())
        .projection(ProjectionOptions::new(Balances::new()).partitions(3))
        .build();
    assert!(
        matches!(refused, Err(StoreError::Config(_))),
        "3 partitions on a 4-partition log: {refused:?}"
    );
    let runner = fast_runner(
        log,
        &read_models,
        ProjectionOptions::new(Balances::new()).batch_size(16),
    );
    let (shutdown, running) = common::start_runner(&runner);

    // Writers while the runner tails the four streams.
    let (accounts, checkpoints) = write(&bus, 0).await;
    assert_eq!(accounts.len(), WRITERS * ACCOUNTS_PER_WRITER + 1);
    let partitions: std::collections::BTreeSet<u32> =
        accounts.iter().map(|a| js.partition_of(a)).collect();
    assert_eq!(
        partitions.len(),
        4,
        "the accounts spread over every partition"
    );
    for checkpoint in &checkpoints {
        runner
            .wait_for(*checkpoint, &["account_balances"], Duration::from_secs(30))
            .await
            .expect("every command's events reach PostgreSQL");
    }
    let rows = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "read model = fold of the log"
    );

    // Status: one unit per stream partition, caught up.
    let statuses = runner.status().await.expect("status");
    assert_eq!(statuses.len(), 4);
    let total: u64 = statuses.iter().map(|s| s.processed).sum();
    let events: u64 = rows.iter().map(|r| r.events as u64).sum();
    assert_eq!(total, events, "every event processed once");
    for status in &statuses {
        assert_eq!(status.partitions, 4);
        assert_eq!(status.lag_events, 0, "{status:?}");
        assert_eq!(status.state, ProjectionState::Live);
    }

    // Stopped, more commands, restarted: lag shows, then it catches up
    // without applying anything twice.
    common::stop_runner(shutdown, running).await;
    let (_, more) = write(&bus, 1).await;
    let lagging: u64 = runner
        .status()
        .await
        .expect("status")
        .iter()
        .map(|s| s.lag_events)
        .sum();
    assert_eq!(
        lagging as usize,
        more.len(),
        "lag counts the unprojected events"
    );
    let (shutdown, running) = common::start_runner(&runner);
    for checkpoint in &more {
        runner
            .wait_for(*checkpoint, &["account_balances"], Duration::from_secs(30))
            .await
            .expect("caught up after the restart");
    }
    let rows = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "read model = fold after the restart"
    );

    // A rebuild replays the four partitions into an emptied table.
    let mut progress = runner.rebuild("account_balances").await.expect("rebuild");
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if progress.borrow_and_update().is_complete() {
                break;
            }
            progress.changed().await.expect("progress");
        }
    })
    .await
    .expect("the rebuild completes");
    assert_eq!(
        progress.borrow().total,
        rows.iter().map(|r| r.events as u64).sum::<u64>()
    );
    for checkpoint in checkpoints.iter().chain(&more) {
        runner
            .wait_for(*checkpoint, &["account_balances"], Duration::from_secs(30))
            .await
            .expect("rebuilt");
    }
    let rebuilt = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(rebuilt, rows, "the rebuild gives the same read model");
    common::stop_runner(shutdown, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stream_projected_into_sqlite_with_a_poison_message_parked() {
    let js = common::jetstream_store(&common::nats_url(), "sqlite_projection", 1).await;
    let dir = common::TestDir::new("jetstream_sqlite");
    let read_models = dir.sqlite().await;
    SqliteBalances::create_table(read_models.writer())
        .await
        .expect("create account_balances");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(js.clone(), ()));
    open_shared(&bus).await;
    let log: Arc<dyn EventLog> = Arc::new(js.clone());
    let runner = fast_runner(
        log,
        &read_models,
        ProjectionOptions::new(SqliteBalances::new()).batch_size(10),
    );
    let (shutdown, running) = common::start_runner(&runner);
    let (accounts, checkpoints) = write(&bus, 0).await;
    let last = checkpoints.iter().max().copied().expect("commands ran");
    runner
        .wait_for(last, &["account_balances"], Duration::from_secs(30))
        .await
        .expect("every command's events reach SQLite");
    let rows = SqliteBalances::rows(read_models.writer())
        .await
        .expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "read model = fold of the log"
    );

    // A message on an account's subject that no Outflow writer wrote (not
    // an append's JSON): parked, named in the wait's error, and the events
    // after it are handled.
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    let raw = async_nats::jetstream::new(client);
    raw.publish(js.subject("account", "poison"), "not json".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let after = bus
        .execute("acc-0-0", BankCommand::Deposit { amount: 5 })
        .await
        .expect("deposit after the poison");
    let waited = runner
        .wait_for(
            after.checkpoint().expect("written"),
            &["account_balances"],
            Duration::from_secs(30),
        )
        .await;
    match waited {
        Err(WaitError::Parked { event, .. }) => assert_eq!(event.aggregate_id, "poison"),
        other => panic!("expected the poison message parked, got {other:?}"),
    }
    let parked = runner
        .dead_letters("account_balances")
        .await
        .expect("dead letters");
    assert_eq!(parked.len(), 1);
    let rows = SqliteBalances::rows(read_models.writer())
        .await
        .expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "the deposit after it was applied"
    );
    let status = common::status_of(&runner, "account_balances").await;
    assert_eq!(status.parked, 1);
    assert_eq!(status.lag_events, 0);
    common::stop_runner(shutdown, running).await;
}
