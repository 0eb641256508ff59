//! The JetStream event store chapter (`docs/src/jetstream.md`): opening the
//! store on a cluster, read models in PostgreSQL, a command retried while the
//! cluster does not answer, and an application moved from PostgreSQL.
//! Run by `tests/jetstream.rs` against the test suite's 3-node cluster and
//! PostgreSQL, but for `open` (it names example hosts). The store's own
//! tests (`tests/tests/jetstream/jetstream_store/`, `tests/tests/jetstream/jetstream_cluster.rs`)
//! hurt real servers.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use outflow::prelude::*;
use outflow::sqlx::{self, Postgres, Transaction};

use crate::quickstart::{Cart, CartCommand, CartError};

// ANCHOR: open
use outflow::store::jetstream::JetStreamStore;

/// The event store on a three-node cluster: four partitions, each a stream
/// replicated on three servers.
pub async fn open() -> Result<JetStreamStore, Box<dyn Error>> {
    let client = async_nats::ConnectOptions::new()
        .name("shop")
        .retry_on_initial_connect() // `connect` fails at once otherwise
        .connect(vec![
            "nats://nats-1.example.com:4222",
            "nats://nats-2.example.com:4222",
            "nats://nats-3.example.com:4222",
        ])
        .await?;
    let store = JetStreamStore::builder(client)
        .prefix("shop") // subjects shop.<partition>.…, streams SHOP_0 … SHOP_3
        .partitions(4) // fixed for the life of the data
        .replicas(3) // the default on a cluster (1 on a single server)
        .timeout(Duration::from_secs(15)) // longer than a leader election
        .poll_interval(Duration::from_secs(1)) // idle readers look this often
        .build()
        .await?;
    assert_eq!(store.partitions(), 4);
    // Where a cart's events live.
    println!(
        "cart-1: partition {} ({}), subject {}",
        store.partition_of("cart-1"),
        store
            .stream_name(store.partition_of("cart-1"))
            .unwrap_or("?"),
        store.subject("cart", "cart-1"),
    );
    Ok(store)
}
// ANCHOR_END: open

// ANCHOR: projection
use outflow::{LogFilter, RecordedEvent};

/// How many items each cart holds, in a PostgreSQL table written in the
/// transaction that also moves the projection's checkpoint. The table has
/// the projection's name.
pub struct CartItems {
    pub name: &'static str,
}

#[async_trait]
impl Projection<PostgresStore> for CartItems {
    fn name(&self) -> &str {
        self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["cart"]).with_event_types(["ItemAdded"])
    }

    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (cart_id TEXT PRIMARY KEY, items BIGINT NOT NULL)",
            self.name
        );
        sqlx::query(&create).execute(&mut **tx).await?;
        Ok(())
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        let upsert = format!(
            "INSERT INTO {0} (cart_id, items) VALUES ($1, 1) \
             ON CONFLICT (cart_id) DO UPDATE SET items = {0}.items + 1",
            self.name
        );
        for event in events {
            sqlx::query(&upsert)
                .bind(&event.aggregate_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(&format!("DELETE FROM {}", self.name))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
// ANCHOR_END: projection

// ANCHOR: runner
use outflow::projection::ProjectionOptions;
use outflow::EventLog;

/// Commands append to JetStream; the runner reads the events from there and
/// commits the read model and its checkpoints in PostgreSQL.
pub async fn shop(events: JetStreamStore, database_url: &str) -> Result<i64, Box<dyn Error>> {
    let read_models = PostgresStore::connect(database_url).await?;
    let carts = CommandBus::<Cart, _>::new(events.clone(), ());

    let log: Arc<dyn EventLog> = Arc::new(events);
    let runner = ProjectionRunner::with_log(log, read_models.clone())
        // As many partitions as the store has (the default); another count
        // above 1 is refused here.
        .projection(ProjectionOptions::new(CartItems { name: "cart_items" }))
        .build()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (runner, shutdown) = (runner.clone(), shutdown.clone());
        async move { runner.run(shutdown).await }
    });

    let done = carts
        .execute("cart-1", CartCommand::AddItem { item: "tea".into() })
        .await?;
    // Waits for the unit of cart-1's partition only: the other partitions'
    // checkpoints do not compare with this one.
    let written = done.checkpoint().ok_or("the command wrote no event")?;
    runner
        .wait_for(written, &["cart_items"], Duration::from_secs(5))
        .await?;
    let (items,): (i64,) = sqlx::query_as("SELECT items FROM cart_items WHERE cart_id = $1")
        .bind("cart-1")
        .fetch_one(read_models.pool())
        .await?;

    shutdown.cancel();
    running.await??;
    Ok(items)
}
// ANCHOR_END: runner

// ANCHOR: unavailable
use outflow::{CommandContext, Committed};

/// Adds an item once, however many attempts it takes: every attempt carries
/// the same command id, so an append that was stored although its answer
/// never came is found by the next attempt instead of written again.
pub async fn add_item_once(
    carts: &CommandBus<Cart, JetStreamStore>,
    cart: &str,
    item: &str,
) -> Result<Committed<Cart>, CommandError<CartError>> {
    let context = CommandContext::new(); // one command id for every attempt
    let mut attempts = 1;
    loop {
        let command = CartCommand::AddItem { item: item.into() };
        match carts.execute_once(cart, command, context.clone()).await {
            // No leader answered within the store's timeout (a majority of
            // the stream's servers is down), or another writer came first.
            Err(CommandError::Store(error))
                if (error.is_unavailable() || error.is_conflict()) && attempts < 5 =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}
// ANCHOR_END: unavailable

/// What the application is made of: a command bus on an event store, and a
/// runner keeping the read models in PostgreSQL.
pub struct Shop<S: EventStore> {
    pub carts: CommandBus<Cart, S>,
    pub projections: ProjectionRunner<PostgresStore>,
}

// ANCHOR: before
/// Before: events, read models and checkpoints in one PostgreSQL database.
pub async fn on_postgres(database_url: &str) -> Result<Shop<PostgresStore>, Box<dyn Error>> {
    let store = PostgresStore::connect(database_url).await?;
    let carts = CommandBus::<Cart, _>::new(store.clone(), ());
    let projections = ProjectionRunner::builder(store)
        .projection(ProjectionOptions::new(CartItems { name: "cart_items" }))
        .build()?;
    Ok(Shop { carts, projections })
}
// ANCHOR_END: before

// ANCHOR: after
/// After: the events in JetStream; the read models, checkpoints, leases and
/// dead letters stay in the same PostgreSQL database. The projection runs
/// under a new name (a new table, filled from the new log), since the old
/// one's checkpoints are positions in the PostgreSQL log.
pub async fn on_jetstream(
    database_url: &str,
    events: JetStreamStore,
) -> Result<Shop<JetStreamStore>, Box<dyn Error>> {
    let read_models = PostgresStore::connect(database_url).await?;
    let carts = CommandBus::<Cart, _>::new(events.clone(), ());
    let log: Arc<dyn EventLog> = Arc::new(events);
    let projections = ProjectionRunner::with_log(log, read_models)
        .projection(ProjectionOptions::new(CartItems {
            name: "cart_items_v2",
        }))
        .build()?;
    Ok(Shop { carts, projections })
}
// ANCHOR_END: after
