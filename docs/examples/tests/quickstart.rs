//! Runs the quickstart chapter's code.

use outflow_book_examples::quickstart::shop;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_runs_and_reads_its_writes() {
    let dir = std::env::temp_dir().join(format!("outflow-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let summary = shop(&dir.join("shop.db")).await.expect("the quickstart");
    assert_eq!((summary.items, summary.checked_out), (1, true));
    // Run again on the same file: the cart is checked out, so adding fails.
    let again = shop(&dir.join("shop.db")).await;
    assert!(again.is_err(), "cart-1 is checked out: {again:?}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
