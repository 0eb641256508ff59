//! The JetStream chapter (`docs/src/relay.md`): the relay publishing the log
//! to a stream, and a consumer applying messages exactly once in effect.
//! Compiled here; the integration tests run the relay and the consumer
//! against a real NATS server.

use std::time::Duration;

use outflow::prelude::*;
use outflow::sqlx::{self, Postgres, Transaction};
use outflow::{LogFilter, RecordedEvent};

// ANCHOR: relay
use outflow::projection::{OnError, ProjectionOptions};
use outflow::relay::{ensure_stream, JetStreamRelay};

/// Relays every cart event to the stream `SHOP` (subjects `shop.>`), in log
/// order, at least once; the broker drops duplicates by event id.
pub async fn relay(
    store: PostgresStore,
    nats_url: &str,
) -> Result<ProjectionRunner<PostgresStore>, Box<dyn std::error::Error>> {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect() // `connect` fails at once otherwise
        .connect(nats_url)
        .await?;
    let jetstream = async_nats::jetstream::new(client);
    // File storage; message ids remembered for 10 minutes.
    ensure_stream(
        &jetstream,
        "SHOP",
        vec!["shop.>".into()],
        Duration::from_secs(600),
    )
    .await?;

    let relay = JetStreamRelay::builder(jetstream, "shop_relay")
        .subject_prefix("shop") // shop.<aggregate_type>.<event_type>
        .filter(LogFilter::aggregate_types(["cart"]))
        .ack_timeout(Duration::from_secs(5))
        .build()?;
    Ok(ProjectionRunner::builder(store)
        .projection(ProjectionOptions::new(relay).on_error(OnError::Stop))
        .build()?)
}
// ANCHOR_END: relay

// ANCHOR: subject
use outflow::relay::{subject_token, JetStreamRelayBuilder};

/// One subject per cart: consumers can filter on a single cart's events.
pub fn per_cart(builder: JetStreamRelayBuilder) -> JetStreamRelayBuilder {
    builder.subject(|event: &RecordedEvent| {
        format!(
            "carts.{}.{}",
            subject_token(&event.aggregate_id),
            event.event_type
        )
    })
}
// ANCHOR_END: subject

// ANCHOR: consumer
use outflow::relay::{JetStreamConsumer, MessageHandler, PostgresDeadMessages, ReceivedMessage};

/// Counts checked-out carts from the stream, in the database's transaction
/// that also records the message as handled: a redelivery changes nothing.
pub struct CountCheckouts;

#[async_trait]
impl MessageHandler<PostgresStore> for CountCheckouts {
    async fn handle(
        &self,
        message: &ReceivedMessage,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        let event: serde_json::Value = message.json()?;
        if event.get("CheckedOut").is_some() {
            sqlx::query("UPDATE checkout_count SET n = n + 1")
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

pub async fn consume(
    store: PostgresStore,
    jetstream: async_nats::jetstream::Context,
    shutdown: CancellationToken,
) -> Result<(), Box<dyn std::error::Error>> {
    let consumer = JetStreamConsumer::builder(
        jetstream,
        "SHOP",
        "checkouts",
        store.clone(),
        CountCheckouts,
    )
    .dead_letters(PostgresDeadMessages::new("events")?) // the store's events table
    .filter_subject("shop.cart.>")
    .max_deliver(5)
    .build()?;
    consumer.run(shutdown).await;
    Ok(())
}
// ANCHOR_END: consumer
