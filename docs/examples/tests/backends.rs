//! Runs the backends chapter's SQLite and memory code.

use outflow_book_examples::backends::{choose, open_sqlite};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_store_opens() {
    let dir = std::env::temp_dir().join(format!("outflow-book-backends-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    choose(&dir.join("a.db")).await.expect("choose");
    let store = open_sqlite(&dir.join("b.db")).await.expect("open");
    drop(store);
    assert!(dir.join("b.db").exists());
    std::fs::remove_dir_all(&dir).expect("clean up");
}
