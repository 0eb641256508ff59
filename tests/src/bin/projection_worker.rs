//! A projection node for `tests/projection_crash.rs`: runs the example's
//! `account_balances` projection on the database given as its first argument
//! (a PostgreSQL URL, or `sqlite:<path>` for a SQLite file), split into the
//! partition count given as the optional second (default 1),
//! until it is killed. Its node id is `worker-<pid>`; its lease is short (1 s)
//! so that another worker can take over soon after it dies, unless
//! `OUTFLOW_WORKER_LEASE_MS` (and `OUTFLOW_WORKER_HEARTBEAT_MS`, default
//! 150) say otherwise.
//!
//! It prints nothing unless it fails, and exits by itself when its standard
//! input closes, so that a test that dies does not leave it running.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use example_accounts::projections::{Balances, SqliteBalances};
use outflow::projection::Projection;
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::store::ProjectionStore;
use outflow::{EventLog, PostgresStore, SqliteStore};
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: projection_worker <database-url> [partitions]");
        return ExitCode::from(2);
    };
    let partitions = match std::env::args().nth(2).map(|n| n.parse::<u32>()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("projection_worker: the partition count must be a positive integer");
            return ExitCode::from(2);
        }
    };
    std::thread::spawn(|| {
        let mut stdin = std::io::stdin();
        let mut buffer = [0u8; 64];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
    if let Some(path) = url.strip_prefix("sqlite:") {
        match SqliteStore::open(path).await {
            Ok(store) => run(store, SqliteBalances::new(), partitions).await,
            Err(error) => {
                eprintln!("projection_worker: opening {path}: {error}");
                ExitCode::FAILURE
            }
        }
    } else {
        match PostgresStore::connect(&url).await {
            Ok(store) => run(store, Balances::new(), partitions).await,
            Err(error) => {
                eprintln!("projection_worker: connecting: {error}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs the projection until killed.
async fn run<S, P>(store: S, projection: P, partitions: u32) -> ExitCode
where
    S: ProjectionStore + EventLog,
    P: Projection<S>,
{
    let runner = match ProjectionRunner::builder(store)
        .node_id(format!("worker-{}", std::process::id()))
        .lease_ttl(millis_from_env("OUTFLOW_WORKER_LEASE_MS", 1000))
        .heartbeat_interval(millis_from_env("OUTFLOW_WORKER_HEARTBEAT_MS", 150))
        .projection(
            ProjectionOptions::new(projection)
                .batch_size(20)
                .partitions(partitions),
        )
        .build()
    {
        Ok(runner) => runner,
        Err(error) => {
            eprintln!("projection_worker: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runner.run(CancellationToken::new()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("projection_worker: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A duration in milliseconds from the environment variable `name`, or
/// `default` when it is unset or not a number.
fn millis_from_env(name: &str, default: u64) -> Duration {
    let millis = std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default);
    Duration::from_millis(millis)
}
