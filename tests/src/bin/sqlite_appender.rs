//! An appender for `tests/sqlite_crash.rs`: appends commands to the SQLite
//! file given as its first argument, one event each over 10 accounts, and
//! prints `<account> <version>` after each append the store acknowledged,
//! until it is killed. Exits by itself when its standard input closes.

use std::io::{Read, Write};
use std::process::ExitCode;

use outflow::{AppendRequest, EventStore, NewEvent, SqliteStore};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: sqlite_appender <file>");
        return ExitCode::from(2);
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
    let store = match SqliteStore::open(&path).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("sqlite_appender: opening {path}: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Continue each account's stream where the file has it.
    let mut versions = [0u64; 10];
    for (account, version) in versions.iter_mut().enumerate() {
        match store
            .load("account", &format!("acc-{account}"), false)
            .await
        {
            Ok(loaded) => *version = loaded.events.last().map_or(0, |e| e.sequence),
            Err(error) => {
                eprintln!("sqlite_appender: loading: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let mut round = 0usize;
    loop {
        let account = round % versions.len();
        let id = format!("acc-{account}");
        let event = NewEvent {
            event_id: uuid::Uuid::now_v7(),
            event_type: "Deposited".into(),
            event_version: "1.0".into(),
            payload: serde_json::json!({ "Deposited": { "amount": 1 } }),
            metadata: Default::default(),
            correlation_id: None,
            causation_id: None,
        };
        let appended = store
            .append(AppendRequest {
                aggregate_type: "account".into(),
                aggregate_id: id.clone(),
                expected_version: versions[account],
                events: vec![event],
            })
            .await;
        match appended {
            Ok(_) => {
                versions[account] += 1;
                // Acknowledged: the test may now rely on it.
                if writeln!(out, "{id} {}", versions[account])
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return ExitCode::SUCCESS;
                }
            }
            Err(error) => {
                eprintln!("sqlite_appender: {error}");
                return ExitCode::FAILURE;
            }
        }
        round += 1;
    }
}
