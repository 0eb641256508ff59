//! Runs the delivery chapter's code on SQLite.

use outflow_book_examples::delivery::live_feed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_counts_commit_with_the_events_and_the_feed_sees_both() {
    let dir = std::env::temp_dir().join(format!("outflow-book-delivery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let (seen, tea) = live_feed(&dir.join("d.db"))
        .await
        .expect("the chapter's code");
    assert_eq!(seen, ["cart-1 ItemAdded", "cart-1 CheckedOut"]);
    assert_eq!(tea, 1);
    std::fs::remove_dir_all(&dir).expect("clean up");
}
