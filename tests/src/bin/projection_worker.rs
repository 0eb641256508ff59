//! A projection node for `tests/projection_crash.rs`: runs the example's
//! `account_balances` projection on the database given as its first argument
//! (split into the partition count given as the optional second, default 1)
//! until it is killed. Its node id is `worker-<pid>`; its lease is short (1 s)
//! so that another worker can take over soon after it dies.
//!
//! It prints nothing unless it fails, and exits by itself when its standard
//! input closes, so that a test that dies does not leave it running.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use example_accounts::projections::Balances;
use outflow::projection::ProjectionOptions;
use outflow::runner::ProjectionRunner;
use outflow::PostgresStore;
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
    let store = match PostgresStore::connect(&url).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("projection_worker: connecting: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runner = match ProjectionRunner::builder(store)
        .node_id(format!("worker-{}", std::process::id()))
        .lease_ttl(Duration::from_secs(1))
        .heartbeat_interval(Duration::from_millis(150))
        .projection(
            ProjectionOptions::new(Balances::new())
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
