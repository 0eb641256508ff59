//! The example application runs with no set-up, keeps one file in the
//! working directory, shows the expected state, and keeps it across runs.

use std::path::Path;
use std::process::Command;

fn run_in(dir: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_example-accounts"))
        .current_dir(dir)
        .output()
        .expect("run the example application");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn assert_contains(stdout: &str, expected: &[&str]) {
    for expected in expected {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
}

#[test]
fn the_example_session_runs_keeps_one_file_and_the_projection_agrees_with_the_aggregates() {
    let dir = std::env::temp_dir().join(format!("outflow-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a working directory");

    let first = run_in(&dir);
    assert_contains(
        &first,
        &[
            "refused: insufficient funds: balance 3500, requested 9000",
            "The balances projection in accounts.db (caught up with position 7, 2 accounts)",
            ": 10000 cents, owner Ann\n",
            ": 0 cents, owner Bob, closed\n",
            "status: account_balances partition 0 is Live, 7 events processed, lag 0",
            ": 0 cents, owner Bob, version 4, closed",
            "The subscriber saw 7 events after their commits.",
        ],
    );
    // One file, nothing beside it once the application has closed the store.
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("list the directory")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, vec!["accounts.db".to_owned()]);

    // A second run adds to the file: the projection has both runs' accounts.
    let second = run_in(&dir);
    assert_contains(
        &second,
        &[
            "caught up with position 14, 4 accounts",
            "status: account_balances partition 0 is Live, 14 events processed, lag 0",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
