//! The aggregates-and-commands chapter (`docs/src/commands.md`): a command
//! bus with snapshots, the aggregate cache and an upcaster, retries on a
//! conflict, a command's context, and given/when/then tests of the
//! quickstart's cart. `tests/commands.rs` runs it.

// ANCHOR: upcaster
use outflow::cqrs_es::persist::SerializedEvent;
use outflow::upcast::{UpcastError, Upcaster};

/// Version "0.9" of `ItemAdded` called its field `name`; the cart reads
/// `item`. Stored events are rewritten as they are read, never in place.
pub struct ItemAddedNameToItem;

impl Upcaster for ItemAddedNameToItem {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        event_type == "ItemAdded" && event_version == "0.9"
    }

    fn upcast(&self, mut event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
        let name = event.payload["ItemAdded"]["name"]
            .as_str()
            .ok_or_else(|| UpcastError::new("`ItemAdded` 0.9 without a `name`"))?
            .to_owned();
        event.payload = serde_json::json!({ "ItemAdded": { "item": name } });
        event.event_version = "1.0".to_owned();
        Ok(event)
    }
}
// ANCHOR_END: upcaster

// ANCHOR: bus
use outflow::prelude::*;
use outflow::CommandContext;

use crate::quickstart::{Cart, CartCommand};

/// A bus for carts with the options a production service usually turns on.
pub fn cart_bus(store: SqliteStore) -> CommandBus<Cart, SqliteStore> {
    CommandBus::builder(store, ())
        // Store the cart's state every 100 events; loads start from it.
        .snapshot_every(100)
        // Keep up to 10,000 carts in memory: a command on one skips the load.
        .cache_aggregates(10_000)
        // Rewrite old event shapes while loading.
        .upcaster(Box::new(ItemAddedNameToItem))
        .build()
}
// ANCHOR_END: bus

// ANCHOR: execute
/// Adds an item, retrying when another writer appended to the cart between
/// this command's load and its append.
pub async fn add_item(
    bus: &CommandBus<Cart, SqliteStore>,
    cart: &str,
    item: &str,
    request_id: &str,
) -> Result<u64, CommandError<crate::quickstart::CartError>> {
    // Every event this command writes carries the request id as metadata,
    // and one correlation id (a fresh one here; `CommandContext::caused_by`
    // continues the chain of an event that caused the command).
    let context = CommandContext::new().with_metadata("request_id", request_id);
    let committed = bus
        .execute_retrying_with(cart, context, 3, || CartCommand::AddItem {
            item: item.to_owned(),
        })
        .await?;
    // The cart's version after the command, and where its events stand in
    // the global log (what `wait_for` and `load_after` take).
    let _in_the_log = committed.checkpoint();
    Ok(committed.version)
}
// ANCHOR_END: execute

// ANCHOR: conflict
/// Two writers load the same version; the second append is refused with a
/// conflict and writes nothing.
pub async fn race(file: &std::path::Path) -> Result<bool, Box<dyn std::error::Error>> {
    let store = SqliteStore::open(file).await?;
    // Two buses with their own caches: like two nodes.
    let (first, second) = (cart_bus(store.clone()), cart_bus(store));
    first
        .execute("cart-9", CartCommand::AddItem { item: "a".into() })
        .await?;
    second
        .execute("cart-9", CartCommand::AddItem { item: "b".into() })
        .await?;
    // `first` still holds version 1 in its cache: its append conflicts.
    match first
        .execute("cart-9", CartCommand::AddItem { item: "c".into() })
        .await
    {
        Err(error) if error.is_conflict() => Ok(true),
        Err(error) => Err(error.into()),
        Ok(_) => Ok(false),
    }
}
// ANCHOR_END: conflict

// ANCHOR: tests
#[cfg(test)]
mod tests {
    use outflow::cqrs_es::test::TestFramework;

    use crate::quickstart::{Cart, CartCommand, CartError, CartEvent};

    // The aggregate alone: no store, no runtime, no Outflow.
    type CartTest = TestFramework<Cart>;

    #[test]
    fn an_item_is_added() {
        CartTest::with(())
            .given_no_previous_events()
            .when(CartCommand::AddItem { item: "tea".into() })
            .then_expect_events(vec![CartEvent::ItemAdded { item: "tea".into() }]);
    }

    #[test]
    fn an_empty_cart_is_not_checked_out() {
        CartTest::with(())
            .given_no_previous_events()
            .when(CartCommand::CheckOut)
            .then_expect_error(CartError::Empty);
    }

    #[test]
    fn a_checked_out_cart_takes_no_more_items() {
        CartTest::with(())
            .given(vec![
                CartEvent::ItemAdded { item: "tea".into() },
                CartEvent::CheckedOut,
            ])
            .when(CartCommand::AddItem {
                item: "milk".into(),
            })
            .then_expect_error(CartError::AlreadyCheckedOut);
    }
}
// ANCHOR_END: tests
