//! The projections chapter (`docs/src/projections.md`): the three ways to
//! write a projection, a side effect outside the transaction, the runner's
//! wiring and shutdown, and a read-your-writes wait. On SQLite, so that the
//! test runs with no server; on PostgreSQL the same code names `PostgresStore`
//! and `sqlx::Postgres` instead. `tests/projections.rs` runs it.

// ANCHOR: batch
use outflow::prelude::*;
use outflow::sqlx::{self, Sqlite, Transaction};
use outflow::{LogFilter, RecordedEvent};

use crate::quickstart::{Cart, CartEvent};

/// How many items each cart holds: a table of its own, written in the
/// transaction that also moves the projection's checkpoint.
pub struct ItemCounts;

#[async_trait]
impl Projection<SqliteStore> for ItemCounts {
    fn name(&self) -> &str {
        "item_counts"
    }

    /// Only carts' events are read (and only `ItemAdded` among them).
    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["cart"]).with_event_types(["ItemAdded"])
    }

    /// Runs before the first batch, in a transaction: the read model's
    /// table and its index, as one script of several statements.
    async fn setup(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), HandlerError> {
        // A script goes through the transaction's `execute` (with
        // `sqlx::Executor` in scope); `raw_sql(..).execute(&mut **tx)`
        // does not compile inside the trait's async methods.
        use sqlx::Executor as _;
        tx.execute(sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS item_counts (cart_id TEXT PRIMARY KEY, items INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS item_counts_by_items ON item_counts (items);",
        ))
        .await?;
        Ok(())
    }

    /// One batch of the log. An error rolls back the batch's writes and its
    /// checkpoint together: the batch is retried, never half-applied.
    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), HandlerError> {
        for event in events {
            sqlx::query(
                "INSERT INTO item_counts (cart_id, items) VALUES ($1, 1) \
                 ON CONFLICT (cart_id) DO UPDATE SET items = items + 1",
            )
            .bind(&event.aggregate_id)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// A rebuild empties the read model, then replays the log from the start.
    async fn reset(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), HandlerError> {
        sqlx::query("DELETE FROM item_counts")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
// ANCHOR_END: batch

// ANCHOR: typed
use outflow::projection::EventHandler;
use outflow::Envelope;

/// Typed events of one aggregate, one at a time: each is decoded (and upcast)
/// into `CartEvent` before `handle` sees it.
pub struct CheckoutLog;

#[async_trait]
impl EventHandler<Cart, SqliteStore> for CheckoutLog {
    fn name(&self) -> &str {
        "checkout_log"
    }

    fn event_types(&self) -> Vec<String> {
        vec!["CheckedOut".to_owned()]
    }

    async fn setup(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), HandlerError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS checkouts (event_id TEXT PRIMARY KEY, cart_id TEXT NOT NULL)",
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn handle(
        &self,
        event: &Envelope<Cart>,
        tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), HandlerError> {
        if let CartEvent::CheckedOut = event.payload {
            sqlx::query("INSERT INTO checkouts (event_id, cart_id) VALUES ($1, $2)")
                .bind(event.event_id.to_string())
                .bind(&event.aggregate_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}
// ANCHOR_END: typed

// ANCHOR: effects
use std::sync::Mutex;

/// A service outside the database (a mailer, a payment provider): it ignores
/// a second request with the same key, as such services usually can.
#[derive(Default)]
pub struct Mailer {
    pub sent: Mutex<Vec<String>>,
}

impl Mailer {
    async fn send_receipt(&self, cart_id: &str, key: &str) -> Result<(), std::io::Error> {
        let mut sent = self
            .sent
            .lock()
            .map_err(|_| std::io::Error::other("mailer poisoned"))?;
        let line = format!("{cart_id} ({key})");
        if !sent.contains(&line) {
            sent.push(line);
        }
        Ok(())
    }
}

/// Sends a receipt for each checkout. The call runs in `effects`, before the
/// batch's transaction opens: a slow mailer delays this projection only, and
/// no database transaction waits on the network.
pub struct Receipts {
    pub mailer: std::sync::Arc<Mailer>,
}

#[async_trait]
impl Projection<SqliteStore> for Receipts {
    fn name(&self) -> &str {
        "receipts"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["cart"]).with_event_types(["CheckedOut"])
    }

    async fn effects(&self, events: &[RecordedEvent]) -> Result<(), HandlerError> {
        for event in events {
            // The event id is the idempotency key: a batch retried after a
            // crash sends nothing twice.
            self.mailer
                .send_receipt(&event.aggregate_id, &event.event_id.to_string())
                .await
                .map_err(HandlerError::transient)?; // an outage: retried, never parked
        }
        Ok(())
    }

    /// Runs only once `effects` succeeded for the whole batch, in the
    /// transaction that moves the checkpoint.
    async fn handle(
        &self,
        _events: &[RecordedEvent],
        _tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}
// ANCHOR_END: effects

// ANCHOR: runner
use std::sync::Arc;
use std::time::Duration;

use outflow::projection::ProjectionOptions;

use crate::quickstart::CartCommand;

/// What the chapter's application leaves behind, for its test.
pub struct Shop {
    pub items_in_cart_1: i64,
    pub checkouts: i64,
    pub receipts: Vec<String>,
}

pub async fn run(file: &std::path::Path) -> Result<Shop, Box<dyn std::error::Error>> {
    let store = SqliteStore::open(file).await?;
    let carts = CommandBus::<Cart, _>::new(store.clone(), ());
    let mailer = Arc::new(Mailer::default());

    let runner = ProjectionRunner::builder(store.clone())
        .node_id("shop-1") // unique per process; random by default
        .projection(ProjectionOptions::new(ItemCounts).batch_size(500))
        .projection(ProjectionOptions::new(outflow::projection::typed(
            CheckoutLog,
        )))
        .projection(ProjectionOptions::new(Receipts {
            mailer: mailer.clone(),
        }))
        .build()?; // refuses empty or duplicate names
    let shutdown = CancellationToken::new();
    let mut running = tokio::spawn({
        let (runner, shutdown) = (runner.clone(), shutdown.clone());
        async move { runner.run(shutdown).await }
    });
    // ANCHOR_END: runner

    // ANCHOR: wait
    carts
        .execute("cart-1", CartCommand::AddItem { item: "tea".into() })
        .await?;
    let done = carts.execute("cart-1", CartCommand::CheckOut).await?;
    // Returns once every named projection has passed the command's events,
    // with an error naming the projection that is stuck or parked them.
    // `checkpoint()` is `None` only for a command that wrote no event.
    let written = done.checkpoint().ok_or("the command wrote no event")?;
    runner
        .wait_for(
            written,
            &["item_counts", "checkout_log", "receipts"],
            Duration::from_secs(5),
        )
        .await?;
    // The read models now show the command.
    let pool = store.readers();
    let (items_in_cart_1,): (i64,) =
        sqlx::query_as("SELECT items FROM item_counts WHERE cart_id = $1")
            .bind("cart-1")
            .fetch_one(pool)
            .await?;
    let (checkouts,): (i64,) = sqlx::query_as("SELECT count(*) FROM checkouts")
        .fetch_one(pool)
        .await?;
    // ANCHOR_END: wait

    // ANCHOR: shutdown
    tokio::select! {
        // Before shutdown, `run` ends only when it refused to start.
        ended = &mut running => ended??,
        // Your own signal handling; here, the end of the work.
        _ = std::future::ready(()) => {
            shutdown.cancel();
            running.await??; // waits for the units to give their leases back
        }
    }
    // ANCHOR_END: shutdown

    let receipts = mailer.sent.lock().map_err(|_| "mailer poisoned")?.clone();
    Ok(Shop {
        items_in_cart_1,
        checkouts,
        receipts,
    })
}
