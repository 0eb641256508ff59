//! Wake-ups between nodes, split projections, partition leaders, and a server
//! without JetStream.

use super::*;

/// Two nodes on one store (two connections): a runner on the first, whose
/// readers would look only every 60 s by themselves, sees an append made
/// through the second at once, woken by the second's signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_append_wakes_the_readers() {
    let writer = common::jetstream_store(&common::nats_url(), "wake", 1).await;
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    let reader = JetStreamStore::builder(client)
        .prefix(writer.prefix())
        .poll_interval(Duration::from_secs(60))
        .build()
        .await
        .expect("the same store on another connection");
    let dir = common::TestDir::new("jetstream_wake");
    let read_models = dir.sqlite().await;
    SqliteBalances::create_table(read_models.writer())
        .await
        .expect("create account_balances");
    let log: Arc<dyn EventLog> = Arc::new(reader);
    let runner = fast_runner(
        log,
        &read_models,
        ProjectionOptions::new(SqliteBalances::new()),
    );
    let (shutdown, running) = common::start_runner(&runner);
    let bus = CommandBus::<BankAccount, _>::new(writer.clone(), ());
    // The runner is idle, waiting, before the appends.
    common::started(&runner, &["account_balances"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..3 {
        let done = bus
            .execute(
                &format!("woken-{round}"),
                BankCommand::Open { owner: "x".into() },
            )
            .await
            .expect("open");
        runner
            .wait_for(
                done.checkpoint().expect("written"),
                &["account_balances"],
                Duration::from_secs(10),
            )
            .await
            .expect("the other node's append is seen long before the 60 s poll");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    common::stop_runner(shutdown, running).await;
}

/// A one-partition store is one total order: a projection split into 3
/// partitions runs on it as on the SQL backends (each unit reads the stream
/// and keeps its aggregates), and equals the fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_projection_on_one_stream() {
    let js = common::jetstream_store(&common::nats_url(), "split", 1).await;
    let db = common::TestDb::new("jetstream_split").await;
    let read_models = db.store().await;
    Balances::create_table(read_models.pool())
        .await
        .expect("create account_balances");
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(js.clone(), ()));
    open_shared(&bus).await;
    let log: Arc<dyn EventLog> = Arc::new(js.clone());
    let runner = fast_runner(
        log,
        &read_models,
        ProjectionOptions::new(Balances::new()).partitions(3),
    );
    let (shutdown, running) = common::start_runner(&runner);
    let (accounts, checkpoints) = write(&bus, 0).await;
    let last = checkpoints.iter().max().copied().expect("commands ran");
    runner
        .wait_for(last, &["account_balances"], Duration::from_secs(30))
        .await
        .expect("every partition of the projection passes the last command");
    assert_eq!(runner.status().await.expect("status").len(), 3);
    let rows = Balances::rows(read_models.pool()).await.expect("rows");
    assert_eq!(
        rows,
        fold_of(&js, &accounts).await,
        "read model = fold of the log"
    );
    common::stop_runner(shutdown, running).await;
}

/// The partitions' leaders are spread over the cluster: 6 partition streams
/// on 3 servers, each server leads 2 once the store is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leaders_are_spread_over_the_cluster() {
    let store = common::jetstream_store(&common::nats_cluster_url(), "spread", 6).await;
    let leaders = store.leaders().await.expect("leaders");
    let mut led: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for leader in &leaders {
        *led.entry(leader.clone().expect("every stream has a leader"))
            .or_default() += 1;
    }
    assert_eq!(led.len(), 3, "every server leads partitions: {leaders:?}");
    assert!(led.values().all(|&n| n == 2), "2 each: {led:?}");
    // Asking again changes nothing when the leaders are spread.
    assert_eq!(store.spread_leaders().await.expect("spread"), leaders);
}

/// Four partitions on three servers spread by the floor/ceiling rule,
/// 2/1/1: no server idle while another leads two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_partition_leaders_leave_no_server_idle() {
    let store = common::jetstream_store(&common::nats_cluster_url(), "spread4", 4).await;
    let leaders = store.leaders().await.expect("leaders");
    let mut led: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for leader in &leaders {
        *led.entry(leader.clone().expect("every stream has a leader"))
            .or_default() += 1;
    }
    assert_eq!(led.len(), 3, "every server leads a partition: {leaders:?}");
    let mut counts: Vec<usize> = led.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 1, 2], "{led:?}");
}

/// The mistakes a user is most likely to make are loud: a server without
/// JetStream gives an infrastructure error naming it, no server at all an
/// `Unavailable` after the timeout, and a store opened with another
/// partition count than its data a configuration error naming the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_jetstream_or_no_server_is_a_loud_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let bin = std::env::var("OUTFLOW_NATS_BIN").expect(
        "OUTFLOW_NATS_BIN is not set: run the tests with scripts/test.sh, which finds nats-server",
    );
    let mut plain = std::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server without JetStream");
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = async_nats::connect(&url).await.expect("connect");
    let refused = JetStreamStore::builder(client)
        .timeout(Duration::from_secs(2))
        .build()
        .await;
    let _ = plain.kill();
    let _ = plain.wait();
    match refused {
        Err(error) => {
            assert_eq!(
                error.kind(),
                outflow::ErrorKind::Infrastructure,
                "{error:?}"
            );
            let text = outflow::error::error_chain(&error).to_lowercase();
            assert!(text.contains("jetstream"), "{text}");
        }
        Ok(_) => panic!("a store on a server without JetStream"),
    }

    // Nothing listens there any more.
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(&url)
        .await
        .expect("a client that connects in the background");
    let began = std::time::Instant::now();
    match JetStreamStore::builder(client)
        .timeout(Duration::from_secs(2))
        .build()
        .await
    {
        Err(error) => assert!(error.is_unavailable(), "{error:?}"),
        Ok(_) => panic!("a store without a server"),
    }
    assert!(began.elapsed() < Duration::from_secs(10));

    // Another partition count than the data's.
    let store = common::jetstream_store(&common::nats_url(), "count", 2).await;
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    match JetStreamStore::builder(client)
        .prefix(store.prefix())
        .partitions(3)
        .build()
        .await
    {
        Err(StoreError::Config(error)) => {
            assert!(
                error.to_string().contains("created with 2 partition"),
                "{error}"
            )
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    let client = async_nats::connect(common::nats_url())
        .await
        .expect("connect");
    let third = format!("{}_2", store.prefix().to_uppercase());
    assert!(
        async_nats::jetstream::new(client)
            .get_stream(&third)
            .await
            .is_err(),
        "the refused open created no stream"
    );
}
