//! The example application runs with no set-up and shows the expected state.

use std::process::Command;

#[test]
fn the_example_session_runs_and_the_projection_agrees_with_the_aggregates() {
    let output = Command::new(env!("CARGO_BIN_EXE_example-accounts"))
        .output()
        .expect("run the example application");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "refused: insufficient funds: balance 3500, requested 9000",
        "The balances projection (caught up with position 7)",
        "  acc-ann: 10000 cents\n",
        "  acc-bob: 0 cents\n",
        "status: balances partition 0 is Live, 7 events processed, lag 0",
        "acc-bob: 0 cents, owner Bob, version 4, closed",
        "The subscriber saw 7 events after their commits.",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
}
