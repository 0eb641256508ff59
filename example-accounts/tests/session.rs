//! The demo runs with no set-up: on SQLite it keeps one file in the working
//! directory (and keeps it across runs); on PostgreSQL it runs the same
//! scenario. Its output shows the expected balances, the duplicate address
//! refused, both transfers' ends, the poison e-mail parked then retried, and
//! every projection live.

mod common;

use std::path::Path;
use std::process::Command;

fn demo(dir: &Path, database_url: Option<&str>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_example-accounts"));
    command.current_dir(dir).env_remove("DATABASE_URL");
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    let output = command.output().expect("run the example application");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn assert_demo_output(stdout: &str) {
    for expected in [
        "refused: the address is already taken",
        "refused: insufficient funds: balance 5000, requested 8000",
        "conflicted (the account is at 3)",
        "retried with the account reloaded: committed at version 4",
        "ended: completed",
        "ended: compensated (the account is closed)",
        "parked: #",
        "and retried: #",
        " Ann         72.00",
        " Bob         80.00",
        " Carl         0.00  closed",
        "refund             10.00      72.00",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    // Three welcome e-mails: Ann, Bob and (after the fix) Eve; not the duplicate.
    assert_eq!(
        stdout.matches("Welcome to Outflow Bank").count(),
        3,
        "{stdout}"
    );
    let projections = stdout
        .split("\nProjections:\n")
        .nth(1)
        .expect("a projections table");
    assert_eq!(projections.lines().count(), 6, "{projections}");
    for line in projections.lines() {
        assert!(
            line.contains(" live ") && line.contains("lag   0") && line.ends_with("parked 0"),
            "{line}"
        );
    }
}

#[test]
fn the_demo_runs_on_sqlite_in_the_working_directory_and_keeps_its_file() {
    let dir = std::env::temp_dir().join(format!("outflow-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a working directory");

    assert_demo_output(&demo(&dir, None));
    // One file, nothing beside it once the application has closed the store.
    let files = || {
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("list the directory")
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    };
    assert_eq!(files(), vec!["accounts.db".to_owned()]);
    // A second run adds to the same file and shows the same story.
    let size = std::fs::metadata(dir.join("accounts.db"))
        .expect("the file")
        .len();
    assert_demo_output(&demo(&dir, None));
    assert_eq!(files(), vec!["accounts.db".to_owned()]);
    assert!(
        std::fs::metadata(dir.join("accounts.db"))
            .expect("the file")
            .len()
            >= size
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_on_postgres() {
    let db = common::Database::new(common::Backend::Postgres, "demo").await;
    let dir = std::env::temp_dir();
    let url = db.url.clone();
    let stdout = tokio::task::spawn_blocking(move || demo(&dir, Some(&url)))
        .await
        .expect("the demo's thread");
    assert_demo_output(&stdout);
}
