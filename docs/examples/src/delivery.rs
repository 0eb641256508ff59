//! The delivery chapter (`docs/src/delivery.md`): an inline handler in the
//! command's transaction, and in-memory publish/subscribe. On SQLite;
//! `tests/delivery.rs` runs it.

// ANCHOR: inline
use outflow::command::InlineHandler;
use outflow::prelude::*;
use outflow::sqlx::{self, Sqlite, Transaction};
use outflow::Envelope;

use crate::quickstart::{Cart, CartCommand, CartEvent};

/// Keeps a count of items per product in the command's own transaction:
/// the count and the events commit together, or neither does.
pub struct ProductCounts;

#[async_trait]
impl InlineHandler<Cart, SqliteStore> for ProductCounts {
    fn name(&self) -> &str {
        "product_counts"
    }

    async fn handle(
        &self,
        events: &[Envelope<Cart>],
        tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), HandlerError> {
        for event in events {
            if let CartEvent::ItemAdded { item } = &event.payload {
                sqlx::query(
                    "INSERT INTO product_counts (item, n) VALUES (?1, 1) \
                     ON CONFLICT (item) DO UPDATE SET n = n + 1",
                )
                .bind(item)
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(())
    }
}
// ANCHOR_END: inline

// ANCHOR: pubsub
use outflow::pubsub::{EventBus, RecvError};

/// Runs commands through a bus that publishes each commit to in-memory
/// subscribers, and returns what one subscriber saw.
pub async fn live_feed(
    file: &std::path::Path,
) -> Result<(Vec<String>, i64), Box<dyn std::error::Error>> {
    let store = SqliteStore::open(file).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS product_counts (item TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    )
    .execute(store.writer())
    .await?;
    let feed = EventBus::new(1_024); // events held for slow subscribers
    let carts = CommandBus::<Cart, _>::builder(store.clone(), ())
        .inline(ProductCounts)
        .publish_to(feed.clone())
        .build();

    let mut subscription = feed.subscribe();
    carts
        .execute("cart-1", CartCommand::AddItem { item: "tea".into() })
        .await?;
    carts.execute("cart-1", CartCommand::CheckOut).await?;

    let mut seen = Vec::new();
    while seen.len() < 2 {
        match subscription.recv().await {
            Ok(event) => seen.push(format!("{} {}", event.aggregate_id, event.event_type)),
            // At most once: a subscriber that fell behind is told how much
            // it missed, and goes on.
            Err(RecvError::Lagged(missed)) => seen.push(format!("missed {missed}")),
            Err(error) => return Err(error.into()),
        }
    }
    let (tea,): (i64,) = sqlx::query_as("SELECT n FROM product_counts WHERE item = 'tea'")
        .fetch_one(store.readers())
        .await?;
    Ok((seen, tea))
}
// ANCHOR_END: pubsub
