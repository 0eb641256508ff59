//! Runs the projections chapter's code.

use outflow_book_examples::projections::run;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chapters_projections_build_their_read_models() {
    let dir = std::env::temp_dir().join(format!("outflow-book-projections-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let shop = run(&dir.join("shop.db")).await.expect("the chapter's code");
    assert_eq!(shop.items_in_cart_1, 1);
    assert_eq!(shop.checkouts, 1);
    assert_eq!(shop.receipts.len(), 1, "{:?}", shop.receipts);
    assert!(
        shop.receipts[0].starts_with("cart-1 ("),
        "{:?}",
        shop.receipts
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}
