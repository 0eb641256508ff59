//! The consumer: a durable JetStream pull consumer whose messages are handled
//! in store transactions, once per message id.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{Config as PullConfig, Stream as MessageStream};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::Context;
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{headers, RelayError};
use crate::error::{error_chain, StoreError};
pub use crate::port::messages::{DeadMessageStore, ReceivedMessage};
use crate::port::projections::ProjectionStore;
use crate::projection::{HandlerError, RetryPolicy};

/// Handles messages of a [`JetStreamConsumer`] inside store transactions.
///
/// ```
/// use outflow::projection::HandlerError;
/// use outflow::relay::{MessageHandler, ReceivedMessage};
/// use outflow::MemoryStore;
/// use outflow::store::memory::MemoryTransaction;
///
/// struct Audit;
///
/// #[async_trait::async_trait]
/// impl MessageHandler<MemoryStore> for Audit {
///     async fn handle(&self, message: &ReceivedMessage, _tx: &mut MemoryTransaction) -> Result<(), HandlerError> {
///         let event: serde_json::Value = message.json()?;
///         println!("{} {:?}: {event}", message.message_id, message.header("Outflow-Event-Type"));
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait MessageHandler<S: ProjectionStore>: Send + Sync + 'static {
    /// Applies one message inside `tx`. The consumer has already claimed the
    /// message id in the inbox in the same transaction, so the effect commits
    /// at most once; it is called again (on a redelivery) only when an earlier
    /// call's transaction did not commit.
    ///
    /// # Errors
    ///
    /// Any [`HandlerError`]: the transaction rolls back and the message is
    /// redelivered later; a [transient](HandlerError::is_transient) error
    /// never parks it.
    async fn handle(
        &self,
        message: &ReceivedMessage,
        tx: &mut S::Transaction,
    ) -> Result<(), HandlerError>;
}

/// Runs a [`MessageHandler`] on a durable JetStream pull consumer.
///
/// **Delivery guarantee:** JetStream delivers each message at least once;
/// each message id's effect in the store happens exactly once, because the
/// handler's writes commit in one transaction with an inbox claim on the id
/// (the `Nats-Msg-Id` header, for relayed events the event id), and the
/// message is acknowledged only after that commit. A redelivery of a
/// committed message (its acknowledgement was lost, the server restarted) is
/// acknowledged without calling the handler.
///
/// Messages are handled in stream order, several per transaction when more
/// are waiting (up to [`batch_size`](JetStreamConsumerBuilder::batch_size));
/// when a batch fails it is rolled back and its messages are handled one by
/// one. A message whose handler fails is negatively acknowledged with a
/// growing delay and comes back later (after the messages behind it); once a
/// non-[transient](HandlerError::is_transient) failure happens on its
/// [`max_deliver`](JetStreamConsumerBuilder::max_deliver)-th delivery or
/// later, it is parked in the [`DeadMessageStore`] (together with its inbox
/// claim) and terminated, so JetStream stops redelivering it. The server-side
/// consumer itself redelivers without limit, so a message is never dropped
/// while the store is unreachable.
///
/// [`run`](Self::run) survives server restarts and outages of the broker and
/// of the store: it waits, reconnects (through the client) and re-creates the
/// consumer when needed.
pub struct JetStreamConsumer<S: ProjectionStore> {
    context: Context,
    stream: String,
    name: String,
    store: S,
    handler: Arc<dyn MessageHandler<S>>,
    dead_letters: Arc<dyn DeadMessageStore<S>>,
    filter_subject: String,
    max_deliver: u32,
    ack_wait: Duration,
    batch_size: usize,
    backoff: RetryPolicy,
    pull_expires: Duration,
}

impl<S: ProjectionStore> std::fmt::Debug for JetStreamConsumer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamConsumer")
            .field("stream", &self.stream)
            .field("name", &self.name)
            .field("filter_subject", &self.filter_subject)
            .field("max_deliver", &self.max_deliver)
            .field("ack_wait", &self.ack_wait)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

/// Builds a [`JetStreamConsumer`].
#[must_use = "a builder does nothing until it is built"]
pub struct JetStreamConsumerBuilder<S: ProjectionStore> {
    context: Context,
    stream: String,
    name: String,
    store: S,
    handler: Arc<dyn MessageHandler<S>>,
    dead_letters: Option<Arc<dyn DeadMessageStore<S>>>,
    filter_subject: String,
    max_deliver: u32,
    ack_wait: Duration,
    batch_size: usize,
    backoff: RetryPolicy,
    pull_expires: Duration,
}

impl<S: ProjectionStore> std::fmt::Debug for JetStreamConsumerBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamConsumerBuilder")
            .field("stream", &self.stream)
            .field("name", &self.name)
            .field("filter_subject", &self.filter_subject)
            .field("max_deliver", &self.max_deliver)
            .field("ack_wait", &self.ack_wait)
            .field("batch_size", &self.batch_size)
            .field("dead_letters", &self.dead_letters.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: ProjectionStore> JetStreamConsumerBuilder<S> {
    /// Where messages that keep failing are parked (required).
    pub fn dead_letters(mut self, dead_letters: impl DeadMessageStore<S>) -> Self {
        self.dead_letters = Some(Arc::new(dead_letters));
        self
    }

    /// Only messages on subjects matching `filter` (wildcards allowed;
    /// default: the whole stream).
    pub fn filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = filter.into();
        self
    }

    /// The delivery on which a failing message is parked (default 5, at
    /// least 1).
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.max_deliver = n.max(1);
        self
    }

    /// How long JetStream waits for an acknowledgement before redelivering
    /// (default 30 s). Keep it above the time a batch takes.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// The most messages handled in one transaction (default 100).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The delay before a failed message comes back: `initial` after the
    /// first delivery, doubling up to `max` (defaults 1 s and 60 s). Also the
    /// wait between attempts to reach the server (then at most 5 s).
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff.initial_backoff = initial;
        self.backoff.max_backoff = max.max(initial);
        self
    }

    /// How long one pull request waits on the server for messages (default
    /// 10 s); shorter notices a lost request sooner.
    pub fn pull_expires(mut self, expires: Duration) -> Self {
        self.pull_expires = expires.max(Duration::from_millis(100));
        self
    }

    /// The consumer.
    ///
    /// # Errors
    ///
    /// [`RelayError::Config`] without [`dead_letters`](Self::dead_letters),
    /// for an empty or invalid stream or consumer name, or a zero `ack_wait`.
    pub fn build(self) -> Result<JetStreamConsumer<S>, RelayError> {
        let valid_name = |name: &str| {
            !name.is_empty()
                && !name
                    .contains(|c: char| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
        };
        if !valid_name(&self.stream) {
            return Err(RelayError::Config(format!(
                "`{}` is not a valid stream name",
                self.stream
            )));
        }
        if !valid_name(&self.name) {
            return Err(RelayError::Config(format!(
                "`{}` is not a valid consumer name",
                self.name
            )));
        }
        if self.ack_wait.is_zero() {
            return Err(RelayError::Config("ack_wait is zero".into()));
        }
        let Some(dead_letters) = self.dead_letters else {
            return Err(RelayError::Config(format!(
                "consumer `{}` has no dead-letter store: call .dead_letters(...)",
                self.name
            )));
        };
        Ok(JetStreamConsumer {
            context: self.context,
            stream: self.stream,
            name: self.name,
            store: self.store,
            handler: self.handler,
            dead_letters,
            filter_subject: self.filter_subject,
            max_deliver: self.max_deliver,
            ack_wait: self.ack_wait,
            batch_size: self.batch_size,
            backoff: self.backoff,
            pull_expires: self.pull_expires,
        })
    }
}

/// One received message with what acknowledges it.
struct Delivery {
    message: ReceivedMessage,
    acker: Acker,
}

/// Why consuming from one message stream stopped.
enum Ended {
    Shutdown,
    Broken(String),
}

impl<S: ProjectionStore> JetStreamConsumer<S> {
    /// A builder for the durable consumer `name` on `stream`, handling
    /// messages with `handler` in transactions of `store`.
    pub fn builder(
        context: Context,
        stream: impl Into<String>,
        name: impl Into<String>,
        store: S,
        handler: impl MessageHandler<S>,
    ) -> JetStreamConsumerBuilder<S> {
        JetStreamConsumerBuilder {
            context,
            stream: stream.into(),
            name: name.into(),
            store,
            handler: Arc::new(handler),
            dead_letters: None,
            filter_subject: String::new(),
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            batch_size: 100,
            backoff: RetryPolicy {
                max_attempts: 5,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(60),
            },
            pull_expires: Duration::from_secs(10),
        }
    }

    /// The consumer's name (also its inbox handler name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the durable consumer on the server unless it exists (an
    /// existing consumer keeps its configuration).
    ///
    /// # Errors
    ///
    /// [`RelayError::JetStream`] when the stream is missing or the server
    /// cannot be reached.
    pub async fn ensure(&self) -> Result<PullConsumer, RelayError> {
        let stream = self.context.get_stream(&self.stream).await.map_err(|e| {
            RelayError::jetstream(format!("looking up stream `{}`", self.stream), e)
        })?;
        let config = PullConfig {
            durable_name: Some(self.name.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Unlimited: parking is decided here, after the store agreed.
            max_deliver: -1,
            filter_subject: self.filter_subject.clone(),
            ..Default::default()
        };
        stream
            .get_or_create_consumer(&self.name, config)
            .await
            .map_err(|e| {
                RelayError::jetstream(
                    format!(
                        "creating consumer `{}` on stream `{}`",
                        self.name, self.stream
                    ),
                    e,
                )
            })
    }

    /// Consumes until `shutdown` is cancelled. Broker and store failures are
    /// logged and waited out; the batch in progress when `shutdown` fires is
    /// finished (its messages acknowledged) first.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let messages = async {
                let consumer = self.ensure().await?;
                consumer
                    .stream()
                    .max_messages_per_batch(self.batch_size)
                    .expires(self.pull_expires)
                    .heartbeat(self.pull_expires / 4)
                    .messages()
                    .await
                    .map_err(|e| {
                        RelayError::jetstream(format!("pulling from consumer `{}`", self.name), e)
                    })
            };
            let reason = match messages.await {
                Ok(messages) => {
                    failures = 0;
                    match self.consume(messages, &shutdown).await {
                        Ended::Shutdown => return,
                        Ended::Broken(reason) => reason,
                    }
                }
                Err(error) => error_chain(&error),
            };
            failures += 1;
            tracing::warn!(consumer = %self.name, failures, "consumer interrupted: {reason}");
            // Capped low: the server may be back any moment.
            let wait = self
                .backoff
                .backoff(failures.min(10))
                .min(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn consume(&self, mut messages: MessageStream, shutdown: &CancellationToken) -> Ended {
        let mut errors = 0u32;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                next = messages.next() => next,
            };
            let first = match next {
                None => return Ended::Broken("the message stream ended".into()),
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    use async_nats::jetstream::consumer::pull::MessagesErrorKind as Kind;
                    if matches!(
                        error.kind(),
                        Kind::ConsumerDeleted
                            | Kind::PushBasedConsumer
                            | Kind::RequestLimitExceeded
                    ) {
                        return Ended::Broken(error_chain(&error));
                    }
                    errors += 1;
                    if errors >= 10 {
                        return Ended::Broken(format!("{errors} errors in a row; last: {error}"));
                    }
                    // The client reconnects and pulls again by itself.
                    tracing::debug!(error = %crate::error::error_chain(&error), consumer = %self.name, "pulling");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ended::Shutdown,
                        _ = tokio::time::sleep(self.backoff.initial_backoff.min(Duration::from_millis(500))) => {}
                    }
                    continue;
                }
            };
            errors = 0;
            let mut batch = Vec::with_capacity(self.batch_size);
            batch.extend(self.delivery(first));
            while batch.len() < self.batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.extend(self.delivery(message)),
                    _ => break,
                }
            }
            self.process(batch).await;
        }
    }

    fn delivery(&self, message: async_nats::jetstream::Message) -> Option<Delivery> {
        let (stream, stream_sequence, deliveries) = match message.info() {
            Ok(info) => (
                info.stream.to_owned(),
                info.stream_sequence,
                u64::try_from(info.delivered).unwrap_or(0),
            ),
            Err(error) => {
                tracing::warn!(error = %crate::error::error_chain(&*error), consumer = %self.name, subject = %message.subject, "not a JetStream delivery, skipped");
                return None;
            }
        };
        let (message, acker) = message.split();
        let headers = message.headers.unwrap_or_default();
        let message_id = headers
            .get_last(headers::MSG_ID)
            .map(|id| id.as_str().to_owned())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("{stream}:{stream_sequence}"));
        Some(Delivery {
            message: ReceivedMessage {
                subject: message.subject.to_string(),
                payload: message.payload.to_vec(),
                headers,
                message_id,
                stream,
                stream_sequence,
                deliveries,
            },
            acker,
        })
    }

    async fn process(&self, batch: Vec<Delivery>) {
        if batch.len() > 1 {
            match self.handle_together(&batch).await {
                Ok(()) => {
                    for delivery in &batch {
                        self.ack(delivery, AckKind::Ack).await;
                    }
                    return;
                }
                Err(error) => {
                    tracing::debug!(consumer = %self.name, messages = batch.len(), "batch failed, one by one now: {}", error.chain());
                }
            }
        }
        for delivery in &batch {
            self.process_one(delivery).await;
        }
    }

    /// Every message of the batch in one transaction.
    async fn handle_together(&self, batch: &[Delivery]) -> Result<(), HandlerError> {
        let span = tracing::info_span!(
            parent: None,
            "outflow.consumer.handle",
            consumer = %self.name,
            messages = batch.len(),
        );
        crate::trace::link_carriers(
            &span,
            batch.iter().map(|delivery| &delivery.message.headers),
        );
        self.handle_together_in(batch).instrument(span).await
    }

    async fn handle_together_in(&self, batch: &[Delivery]) -> Result<(), HandlerError> {
        let mut tx = self.store.begin().await?;
        for delivery in batch {
            if self
                .store
                .inbox_claim(&mut tx, &self.name, &delivery.message.message_id)
                .await?
            {
                self.handler.handle(&delivery.message, &mut tx).await?;
            }
        }
        self.store.commit(tx).await?;
        Ok(())
    }

    async fn handle_one(&self, message: &ReceivedMessage) -> Result<(), HandlerError> {
        // One message continues the trace its event was written in.
        let span = tracing::info_span!(
            parent: None,
            "outflow.consumer.handle",
            consumer = %self.name,
            messages = 1,
            message_id = %message.message_id,
        );
        crate::trace::follow_carrier(&span, &message.headers);
        self.handle_one_in(message).instrument(span).await
    }

    async fn handle_one_in(&self, message: &ReceivedMessage) -> Result<(), HandlerError> {
        let mut tx = self.store.begin().await?;
        if !self
            .store
            .inbox_claim(&mut tx, &self.name, &message.message_id)
            .await?
        {
            tracing::debug!(consumer = %self.name, message_id = %message.message_id, "already handled");
            return Ok(());
        }
        self.handler.handle(message, &mut tx).await?;
        self.store.commit(tx).await?;
        Ok(())
    }

    async fn process_one(&self, delivery: &Delivery) {
        let message = &delivery.message;
        let error = match self.handle_one(message).await {
            Ok(()) => return self.ack(delivery, AckKind::Ack).await,
            Err(error) => error,
        };
        // Only the data's fault may park a message: a lost connection or a
        // missing table is redelivered until it passes or is fixed.
        let transient =
            error.kind_with(|e| self.store.classify(e)) != crate::error::ErrorKind::Data;
        if !transient && message.deliveries >= u64::from(self.max_deliver) {
            match self.park(message, &error).await {
                Ok(()) => {
                    tracing::warn!(
                        consumer = %self.name,
                        message_id = %message.message_id,
                        subject = %message.subject,
                        deliveries = message.deliveries,
                        "parked: {}", error.chain()
                    );
                    metrics::counter!("outflow_consumer_parked_total", "consumer" => self.name.clone())
                        .increment(1);
                    return self.ack(delivery, AckKind::Term).await;
                }
                Err(park_error) => {
                    tracing::warn!(consumer = %self.name, message_id = %message.message_id, "parking failed: {park_error}");
                }
            }
        } else {
            tracing::warn!(
                consumer = %self.name,
                message_id = %message.message_id,
                subject = %message.subject,
                deliveries = message.deliveries,
                transient,
                "handler failed, redelivering later: {}", error.chain()
            );
        }
        let attempt = u32::try_from(message.deliveries)
            .unwrap_or(u32::MAX)
            .clamp(1, 10);
        let delay = self.backoff.backoff(attempt);
        self.ack(delivery, AckKind::Nak(Some(delay))).await;
    }

    async fn park(
        &self,
        message: &ReceivedMessage,
        error: &HandlerError,
    ) -> Result<(), StoreError> {
        let mut tx = self.store.begin().await?;
        if self
            .store
            .inbox_claim(&mut tx, &self.name, &message.message_id)
            .await?
        {
            self.dead_letters
                .park(&mut tx, &self.name, message, &error.chain())
                .await?;
        }
        self.store.commit(tx).await
    }

    /// Acknowledges; a lost acknowledgement only means a redelivery, which
    /// the inbox turns into a no-op.
    async fn ack(&self, delivery: &Delivery, kind: AckKind) {
        if let Err(error) = delivery.acker.ack_with(kind).await {
            tracing::debug!(error = %crate::error::error_chain(&*error), consumer = %self.name, message_id = %delivery.message.message_id, "acknowledging");
        }
    }
}
