//! The quickstart chapter (`docs/src/quickstart.md`): a shopping cart
//! aggregate, a command, a projection, and a read-your-writes query, on a
//! SQLite file. The chapter includes this file's parts by anchor;
//! `tests/quickstart.rs` runs them.

// ANCHOR: aggregate
use outflow::cqrs_es::event_sink::EventSink;
use outflow::prelude::*;
use serde::{Deserialize, Serialize};

/// A shopping cart: the aggregate. Its state is rebuilt from its events.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Cart {
    items: Vec<String>,
    checked_out: bool,
}

/// What a client may ask of a cart.
#[derive(Debug, Deserialize)]
pub enum CartCommand {
    AddItem { item: String },
    CheckOut,
}

/// What happened to a cart: the facts Outflow stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CartEvent {
    ItemAdded { item: String },
    CheckedOut,
}

impl DomainEvent for CartEvent {
    fn event_type(&self) -> String {
        match self {
            CartEvent::ItemAdded { .. } => "ItemAdded".to_owned(),
            CartEvent::CheckedOut => "CheckedOut".to_owned(),
        }
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a cart refused a command.
#[derive(Debug, PartialEq)]
pub enum CartError {
    AlreadyCheckedOut,
    Empty,
}

impl std::fmt::Display for CartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CartError::AlreadyCheckedOut => f.write_str("the cart is already checked out"),
            CartError::Empty => f.write_str("an empty cart cannot be checked out"),
        }
    }
}

impl std::error::Error for CartError {}

impl Aggregate for Cart {
    const TYPE: &'static str = "cart";
    type Command = CartCommand;
    type Event = CartEvent;
    type Error = CartError;
    type Services = ();

    // ANCHOR: handle
    /// Decides: checks the rules against the current state, writes events.
    async fn handle(
        &mut self,
        command: CartCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CartError> {
        if self.checked_out {
            return Err(CartError::AlreadyCheckedOut);
        }
        match command {
            CartCommand::AddItem { item } => sink.write(CartEvent::ItemAdded { item }, self).await,
            CartCommand::CheckOut if self.items.is_empty() => return Err(CartError::Empty),
            CartCommand::CheckOut => sink.write(CartEvent::CheckedOut, self).await,
        }
        Ok(())
    }

    /// Applies: changes the state, never refuses (the event happened).
    fn apply(&mut self, event: CartEvent) {
        match event {
            CartEvent::ItemAdded { item } => self.items.push(item),
            CartEvent::CheckedOut => self.checked_out = true,
        }
    }
    // ANCHOR_END: handle
}
// ANCHOR_END: aggregate

// ANCHOR: view
/// The read model: what a cart page shows, kept up to date by a projection.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CartSummary {
    pub items: usize,
    pub checked_out: bool,
}

impl View<Cart> for CartSummary {
    fn update(&mut self, event: &EventEnvelope<Cart>) {
        match &event.payload {
            CartEvent::ItemAdded { .. } => self.items += 1,
            CartEvent::CheckedOut => self.checked_out = true,
        }
    }
}
// ANCHOR_END: view

// ANCHOR: run
use std::time::Duration;

use outflow::view::ViewProjection;

/// The whole application: the store, the command bus, the projection
/// running in the background, and a query that sees the command's effect.
pub async fn shop(file: &std::path::Path) -> Result<CartSummary, Box<dyn std::error::Error>> {
    // One file, no server. (`PostgresStore::connect(url)` for PostgreSQL.)
    let store = SqliteStore::open(file).await?;
    let carts = CommandBus::<Cart, _>::new(store.clone(), ());

    // The projection writes `CartSummary` rows into the table `cart_summaries`
    // of the same file; `query` reads them from anywhere in the application.
    // ANCHOR: view_projection
    let summaries = ViewProjection::<Cart, CartSummary>::new("cart_summaries", "cart_summaries")?;
    let query = summaries.query(&store);
    // ANCHOR_END: view_projection
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(summaries))
        .build()?;
    let shutdown = CancellationToken::new();
    let projections = tokio::spawn({
        let (runner, shutdown) = (runner.clone(), shutdown.clone());
        async move { runner.run(shutdown).await }
    });

    // Commands: each appends its events, or is refused and writes nothing.
    carts
        .execute("cart-1", CartCommand::AddItem { item: "tea".into() })
        .await?;
    match carts.execute("cart-2", CartCommand::CheckOut).await {
        Err(CommandError::Rejected(reason)) => println!("refused: {reason}"),
        other => println!("unexpected: {other:?}"),
    }
    let done = carts.execute("cart-1", CartCommand::CheckOut).await?;

    // Read-your-writes: wait until the projection has this command's events.
    let summary = query
        .load_after(done.checkpoint(), "cart-1", Duration::from_secs(5))
        .await?
        .unwrap_or_default();
    println!(
        "cart-1: {} item(s), checked out: {}",
        summary.items, summary.checked_out
    );

    shutdown.cancel();
    projections.await??;
    store.close().await;
    Ok(summary)
}
// ANCHOR_END: run
