//! Integration tests for Outflow against real servers, and their shared
//! set-up. The tests live in `tests/`, one file per behaviour (each takes
//! these fixtures with `use outflow_tests as common;`); run them with
//! `scripts/test.sh`.
//!
//! The fixtures: each test gets a database of its
//! own on the server that `scripts/test.sh` started (`DATABASE_URL`), or a
//! SQLite file of its own in a temporary directory.

pub mod nats;
pub mod nats_cluster;
pub mod outbox;
pub mod own_postgres;
pub mod tally;
pub mod totals;
pub mod traces;

use std::time::Duration;

use outflow::runner::{ProjectionRunner, ProjectionStatus};
use outflow::store::ProjectionStore;
use outflow::{Checkpoint, LogFilter, PostgresStore, RecordedEvent, SqliteStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A fresh, empty database.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Connection options for it.
    pub options: PgConnectOptions,
}

/// The server URL. Tests need a real server: a missing `DATABASE_URL` fails
/// the test (run the suite through `scripts/test.sh`, which provides one).
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the tests with scripts/test.sh, which starts PostgreSQL",
    )
}

impl TestDb {
    /// Creates a database named after the test plus a random suffix.
    pub async fn new(label: &str) -> TestDb {
        let admin: PgConnectOptions = server_url().parse().expect("DATABASE_URL is a valid URL");
        let name = format!(
            "t_{}_{}",
            label
                .to_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut conn = admin.connect().await.expect("connect to the test server");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        TestDb {
            options: admin.database(&name),
            name,
        }
    }

    /// A pool of up to `size` connections to this database.
    pub async fn pool(&self, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(self.options.clone())
            .await
            .expect("connect to the test database")
    }

    /// An Outflow store on a new pool, with migrations applied.
    pub async fn store(&self) -> PostgresStore {
        PostgresStore::builder(self.pool(40).await)
            .build()
            .await
            .expect("build the store")
    }
}

/// Reads the whole log after `after` (batches of `batch`), retrying until at
/// least `expected` events arrived. Other tests on the same server may hold
/// transactions open for a moment, which holds every reader back; waiting is
/// right, asserting on the first read is not.
pub async fn read_until<S: outflow::EventLog + ?Sized>(
    store: &S,
    after: Checkpoint,
    filter: &LogFilter,
    expected: usize,
) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut events: Vec<RecordedEvent> = Vec::new();
    let mut cursor = after;
    loop {
        let batch = store
            .read_log(cursor, filter, 1000)
            .await
            .expect("read the log");
        if let Some(last) = batch.last() {
            cursor = last.checkpoint();
        }
        let empty = batch.is_empty();
        events.extend(batch);
        if events.len() >= expected {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {expected} events became readable within 60 s",
            events.len()
        );
        if empty {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `runner` in a task until the returned token is cancelled.
pub fn start_runner<S: ProjectionStore>(
    runner: &ProjectionRunner<S>,
) -> (CancellationToken, JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn({
        let runner = runner.clone();
        let shutdown = shutdown.clone();
        async move { runner.run(shutdown).await.expect("the runner runs") }
    });
    (shutdown, handle)
}

/// Stops a runner started with [`start_runner`] and waits for it (30 s at
/// most).
pub async fn stop_runner(shutdown: CancellationToken, handle: JoinHandle<()>) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("the runner stops within 30 s")
        .expect("the runner task ends cleanly");
}

/// Polls `probe` every 50 ms until it returns `Ok`; panics after `timeout`
/// with the last thing it saw. Returns the value and how long it took.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let started = std::time::Instant::now();
    loop {
        let last = match probe().await {
            Ok(value) => return (value, started.elapsed()),
            Err(last) => last,
        };
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long the status helpers wait.
pub const STATUS_WAIT: Duration = Duration::from_secs(60);

/// Polls the status of `name` until `done` holds (60 s at most).
pub async fn wait_for_status<S: ProjectionStore>(
    runner: &ProjectionRunner<S>,
    name: &str,
    done: impl Fn(&ProjectionStatus) -> bool,
) -> ProjectionStatus {
    let deadline = tokio::time::Instant::now() + STATUS_WAIT;
    loop {
        let status = runner
            .status()
            .await
            .expect("status")
            .into_iter()
            .find(|s| s.projection == name);
        if let Some(status) = status {
            if done(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{name}` never reached the expected status; last: {status:?}"
            );
        } else {
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{name}` was never registered"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status of `name` now (it must be registered).
pub async fn status_of<S: ProjectionStore>(
    runner: &ProjectionRunner<S>,
    name: &str,
) -> ProjectionStatus {
    runner
        .status()
        .await
        .expect("status")
        .into_iter()
        .find(|s| s.projection == name)
        .unwrap_or_else(|| panic!("no status for `{name}`"))
}

/// Waits until the running runner has registered `names`, so that their
/// status can be read.
pub async fn started<S: ProjectionStore>(runner: &ProjectionRunner<S>, names: &[&str]) {
    for name in names {
        wait_for_status(runner, name, |_| true).await;
    }
}

/// A temporary directory for SQLite files, removed when dropped.
pub struct TestDir {
    /// The directory.
    pub path: std::path::PathBuf,
}

impl TestDir {
    /// A new, empty directory named after the test.
    pub fn new(label: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!(
            "outflow-test-{label}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TestDir { path }
    }

    /// A path for a database file in it.
    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.path.join(name)
    }

    /// A SQLite store in a new file of this directory.
    pub async fn sqlite(&self) -> SqliteStore {
        SqliteStore::open(self.file("events.db"))
            .await
            .expect("open the SQLite store")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One `#[tokio::test]` per suite and backend: `$suite(store)` runs on a
/// `MemoryStore`, a `PostgresStore` in a fresh database, and a `SqliteStore`
/// in a fresh file. Each line names the suite and its three tests.
#[macro_export]
macro_rules! on_every_backend {
    ($($suite:ident: $memory:ident, $postgres:ident, $sqlite:ident;)*) => {$(
        #[tokio::test]
        async fn $memory() {
            $suite(outflow::MemoryStore::new()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let db = $crate::TestDb::new(stringify!($postgres)).await;
            $suite(db.store().await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let dir = $crate::TestDir::new(stringify!($sqlite));
            $suite(dir.sqlite().await).await;
        }
    )*};
}

/// A `Deposited` event of `amount`, as the log tests write them.
pub fn deposit_event(amount: u64) -> outflow::NewEvent {
    outflow::NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Deposited".into(),
        event_version: "1.0".into(),
        payload: serde_json::json!({ "Deposited": { "amount": amount } }),
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    }
}

/// `count` deposits for one stream expected at `expected` (amounts follow
/// the sequences they will get).
pub fn deposits(
    aggregate_type: &str,
    id: &str,
    expected: u64,
    count: u64,
) -> outflow::AppendRequest {
    outflow::AppendRequest {
        aggregate_type: aggregate_type.into(),
        aggregate_id: id.into(),
        expected_version: expected,
        events: (0..count)
            .map(|n| deposit_event(expected + n + 1))
            .collect(),
    }
}

/// The single JetStream server scripts/test.sh starts (`NATS_URL`).
pub fn nats_url() -> String {
    std::env::var("NATS_URL")
        .expect("NATS_URL is not set: run the tests with scripts/test.sh, which starts nats-server")
}

/// The 3-node JetStream cluster scripts/test.sh starts (`NATS_CLUSTER_URL`:
/// its three client URLs, comma-separated).
pub fn nats_cluster_url() -> String {
    std::env::var("NATS_CLUSTER_URL").expect(
        "NATS_CLUSTER_URL is not set: run the tests with scripts/test.sh, which starts a 3-node JetStream cluster",
    )
}

/// A JetStream event store of `partitions` on the servers at `urls` (comma
/// separated), under a prefix no other test uses.
pub async fn jetstream_store(
    urls: &str,
    label: &str,
    partitions: u32,
) -> outflow::store::jetstream::JetStreamStore {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(300)))
        .connect(urls.split(',').map(str::to_owned).collect::<Vec<_>>())
        .await
        .expect("connect to nats-server");
    let prefix = format!(
        "t{}_{}",
        label.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    outflow::store::jetstream::JetStreamStore::builder(client)
        .prefix(prefix)
        .partitions(partitions)
        .timeout(Duration::from_secs(10))
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("a JetStream store")
}

/// Serves `router` (an operators' console) under `/admin` on a free
/// loopback port, for as long as the runtime runs; returns its base URL
/// (`http://127.0.0.1:PORT/admin`).
pub async fn serve_console(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let address = listener.local_addr().expect("its address");
    let app = axum::Router::new().nest("/admin", router);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{address}/admin")
}
