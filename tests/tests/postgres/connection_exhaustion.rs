//! Connection exhaustion: another client holds every connection the
//! runner's role may open (a role with a connection limit, so the rest of
//! the server is untouched). Connecting fails at once with the server's own
//! error, classified transient; a running runner retries with backoff — a
//! proxy counts its connection attempts, which stay few — handles nothing
//! meanwhile, and catches up on every event once the connections are free.

use outflow_tests as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outflow::projection::{HandlerError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::{
    AppendRequest, Checkpoint, ErrorKind, EventStore, LogFilter, NewEvent, PostgresStore,
    RecordedEvent,
};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Postgres, Transaction};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// Connections the runner's role may hold.
const LIMIT: usize = 3;
/// Events appended while the connections are taken.
const EVENTS: usize = 50;
/// How long the connections stay taken.
const EXHAUSTED: Duration = Duration::from_secs(3);

/// Forwards connections to `upstream`, counting them.
async fn counting_proxy(upstream: String, attempts: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let port = listener.local_addr().expect("the proxy's address").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            attempts.fetch_add(1, Ordering::AcqRel);
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(upstream).await {
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

/// Records each event it sees.
struct Seen;

#[outflow::async_trait]
impl Projection<PostgresStore> for Seen {
    fn name(&self) -> &str {
        "seen"
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        for event in events {
            sqlx::query("INSERT INTO seen (position) VALUES ($1)")
                .bind(event.position as i64)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

async fn seen(store: &PostgresStore) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM seen")
        .fetch_one(store.pool())
        .await
        .expect("count the seen events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_waits_out_exhausted_connections_and_catches_up() {
    let db = common::TestDb::new("exhaustion").await;
    let admin = db.store().await;
    let role = format!("ex_{}", &db.name[db.name.len() - 8..]);
    for statement in [
        format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT {LIMIT}"),
        format!("GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"),
        "CREATE TABLE seen (position bigint PRIMARY KEY)".to_owned(),
        format!("GRANT ALL ON seen TO {role}"),
    ] {
        sqlx::query(&statement)
            .execute(admin.pool())
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let as_role: PgConnectOptions = db.options.clone().username(&role);

    // The runner reaches the server through a proxy that counts attempts.
    let attempts = Arc::new(AtomicUsize::new(0));
    let port = counting_proxy(
        format!("{}:{}", db.options.get_host(), db.options.get_port()),
        attempts.clone(),
    )
    .await;
    let through_proxy = as_role.clone().host("127.0.0.1").port(port);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .idle_timeout(Duration::from_millis(300))
        .max_lifetime(Duration::from_millis(600))
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(through_proxy.clone())
        .await
        .expect("the runner's pool");
    let store = PostgresStore::builder(pool)
        .migrate(false)
        .build()
        .await
        .expect("the runner's store");
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(Seen))
        .build()
        .expect("a runner");
    runner.setup().await.expect("register the projection");

    // Another client takes every connection the role may have; the
    // runner's pool lets its own expire.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut hog = Vec::new();
    while hog.len() < LIMIT + 2 {
        match as_role.connect().await {
            Ok(connection) => hog.push(connection),
            Err(_) => break,
        }
    }
    assert!(!hog.is_empty(), "the hog got no connection");

    // Connecting now fails at once, with the server's reason, as transient.
    let refused = PostgresStore::connect(&format!(
        "postgres://{role}@127.0.0.1:{port}/{}?sslmode=disable",
        db.name
    ))
    .await
    .expect_err("no connection is left");
    assert_eq!(refused.kind(), ErrorKind::Transient, "{refused}");
    let chain = outflow::error::error_chain(&refused);
    assert!(chain.contains("too many connections"), "{chain}");

    let (shutdown, handle) = common::start_runner(&runner);
    let before = attempts.load(Ordering::Acquire);
    let mut last = Checkpoint::START;
    for i in 0..EVENTS {
        last = admin
            .append(AppendRequest {
                aggregate_type: "account".into(),
                aggregate_id: format!("acc-{i}"),
                expected_version: 0,
                events: vec![NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: "Opened".into(),
                    event_version: "1.0".into(),
                    payload: json!({ "Opened": {} }),
                    metadata: Default::default(),
                    correlation_id: None,
                    causation_id: None,
                }],
            })
            .await
            .expect("append")[0]
            .checkpoint();
    }
    tokio::time::sleep(EXHAUSTED).await;
    let during = attempts.load(Ordering::Acquire) - before;
    assert_eq!(seen(&admin).await, 0, "handled without a connection?");
    // Backoff, not a hot loop: a few attempts a second at most.
    assert!(
        during <= 10 * EXHAUSTED.as_secs() as usize,
        "{during} connection attempts in {EXHAUSTED:?}"
    );

    for connection in hog {
        connection.close().await.expect("free a connection");
    }
    common::read_until(&admin, Checkpoint::START, &LogFilter::all(), EVENTS).await;
    runner
        .wait_for(last, &["seen"], Duration::from_secs(60))
        .await
        .expect("caught up once connections were free");
    assert_eq!(seen(&admin).await, EVENTS as i64);
    println!("{during} connection attempts while exhausted for {EXHAUSTED:?}");
    common::stop_runner(shutdown, handle).await;
}
