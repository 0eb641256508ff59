//! The quickstart as a program: `cargo run -p outflow-book-examples --bin quickstart`.

use outflow_book_examples::quickstart::shop;

// ANCHOR: main
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    shop(std::path::Path::new("shop.db")).await?;
    Ok(())
}
// ANCHOR_END: main
