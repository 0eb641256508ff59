//! Runs the personal data chapter's code on a SQLite file: customers
//! register and order; one is forgotten; the aggregate, the directory and
//! a rebuilt directory read the forgotten customer's name as forgotten, the
//! other's as before; and neither name is in the file.

use std::time::Duration;

use outflow::{CancellationToken, EventStore};
use outflow_book_examples::personal::{forget_customer, open_shop, shown_name, CustomerCommand};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outflow-book-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_is_forgotten() {
    let dir = scratch("personal");
    let path = dir.join("shop.db");
    let shop = open_shop(&path).await.expect("the shop");
    let stop = CancellationToken::new();
    let runner = tokio::spawn({
        let runner = shop.runner.clone();
        let stop = stop.clone();
        async move { runner.run(stop).await }
    });
    let mut last = None;
    for (id, name) in [("c-1", "Greta Forgetful"), ("c-2", "Hugo Remembered")] {
        shop.customers
            .execute(
                id,
                CustomerCommand::Register {
                    name: name.into(),
                    email: format!("{id}@shop.example"),
                },
            )
            .await
            .expect("register");
        let done = shop
            .customers
            .execute(id, CustomerCommand::PlaceOrder)
            .await
            .expect("order");
        last = done.checkpoint();
    }
    shop.runner
        .wait_for(last, &["directory"], Duration::from_secs(30))
        .await
        .expect("the directory");
    assert_eq!(
        shown_name(&shop, "c-1").await.expect("name"),
        "Greta Forgetful"
    );

    assert!(forget_customer(&shop, "c-1").await.expect("forget"));
    assert_eq!(
        shown_name(&shop, "c-1").await.expect("name"),
        "(forgotten customer)"
    );
    assert_eq!(
        shown_name(&shop, "c-2").await.expect("name"),
        "Hugo Remembered"
    );
    let line = shop
        .directory
        .load("c-1")
        .await
        .expect("load")
        .expect("line");
    assert!(line.name.is_forgotten());
    assert_eq!(line.orders, 1);
    // Rebuilt, the directory holds the mark of a forgotten value.
    let mut progress = shop.runner.rebuild("directory").await.expect("rebuild");
    while !progress.borrow().is_complete() {
        progress.changed().await.expect("progress");
    }
    let line = shop
        .directory
        .load("c-1")
        .await
        .expect("load")
        .expect("line");
    assert!(line.name.is_forgotten());
    let other = shop
        .directory
        .load("c-2")
        .await
        .expect("load")
        .expect("line");
    assert_eq!(
        other.name.value().map(String::as_str),
        Some("Hugo Remembered")
    );
    // The erasure is in the log; the name is nowhere in the file.
    let erasures = shop
        .store
        .read_stream(outflow::personal::ERASURE_STREAM, "c-1", 0, 10)
        .await
        .expect("read");
    assert_eq!(erasures.len(), 1);
    let (customer, _) = shop.customers.load("c-1").await.expect("load");
    assert!(customer.registered && customer.email.is_forgotten());
    stop.cancel();
    runner.await.expect("runner").expect("runner");
    shop.store.close().await;
    let bytes = std::fs::read(&path).expect("the file");
    for name in ["Greta Forgetful", "Hugo Remembered", "c-1@shop.example"] {
        assert!(
            !bytes.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} is in the file"
        );
    }
}
