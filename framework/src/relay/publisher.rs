//! The relay: a projection that publishes each event as one JetStream message.

use std::future::IntoFuture;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::{HeaderMap, HeaderValue};
use async_trait::async_trait;
use chrono::SecondsFormat;

use super::{headers, subject_token, validate_subject, RelayError};
use crate::event::RecordedEvent;
use crate::port::events::Transactional;
use crate::port::log::LogFilter;
use crate::projection::{HandlerError, Projection};

/// Maps an event to the subject it is published on.
pub type SubjectFn = Arc<dyn Fn(&RecordedEvent) -> String + Send + Sync>;

/// A [`Projection`] that publishes every event it reads as one JetStream
/// message, and succeeds only when JetStream acknowledged all of them.
///
/// Run it with a [`ProjectionRunner`](crate::runner::ProjectionRunner) like
/// any projection: it has a durable checkpoint, can be partitioned, paused and
/// rebuilt (a rebuild publishes everything again; JetStream drops what is
/// still within its duplicate window, and consumers keyed on `Nats-Msg-Id`
/// skip the rest). It writes nothing to the store.
///
/// **Delivery guarantee:** every event reaches the stream at least once; with
/// the stream's duplicate window longer than the relay's longest retry, the
/// stream holds each event exactly once. Each batch is acknowledged whole
/// before the next is sent, so batches land in log order (per relay
/// partition); within a batch that a broker outage interrupted, messages may
/// land out of order (part of the first attempt is lost with the connection,
/// the rest lands on reconnect, the retry fills the gap), which the
/// `Outflow-Sequence` and `Outflow-Position` headers let consumers detect.
///
/// A batch is published pipelined (all messages sent, then every
/// acknowledgement awaited). A failed publish or a missing acknowledgement —
/// the server is down, restarting, has no stream for the subject — fails the
/// batch with a [transient](HandlerError::is_transient) error: the runner
/// rolls back, waits and publishes the whole batch again (with the same
/// message ids), for as long as it takes, never parking an event and never
/// moving the checkpoint past an unacknowledged one. An error that the event
/// itself causes (a subject the mapping makes invalid, a header value with a
/// line break, a payload larger than the server accepts) is not transient, so
/// the runner's [`OnError`](crate::projection::OnError) policy applies; use
/// [`OnError::Stop`](crate::projection::OnError::Stop) to never skip an event.
///
/// ```no_run
/// # async fn demo(store: outflow::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use outflow::projection::{OnError, ProjectionOptions};
/// use outflow::relay::{ensure_stream, JetStreamRelay};
/// use outflow::runner::ProjectionRunner;
/// use outflow::LogFilter;
/// use tokio_util::sync::CancellationToken;
///
/// let client = async_nats::ConnectOptions::new()
///     .retry_on_initial_connect()
///     .connect("nats://127.0.0.1:4222")
///     .await?;
/// let jetstream = async_nats::jetstream::new(client);
/// ensure_stream(&jetstream, "BANK", vec!["bank.>".into()], Duration::from_secs(600)).await?;
///
/// // Subjects `bank.<aggregate_type>.<event_type>`, e.g. `bank.account.Deposited`.
/// let relay = JetStreamRelay::builder(jetstream, "bank_relay")
///     .subject_prefix("bank")
///     .filter(LogFilter::aggregate_types(["account"]))
///     .ack_timeout(Duration::from_secs(5))
///     .build()?;
/// let runner = ProjectionRunner::builder(store)
///     .projection(ProjectionOptions::new(relay).on_error(OnError::Stop))
///     .build()?;
/// runner.run(CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
pub struct JetStreamRelay {
    name: String,
    context: Context,
    subject: SubjectFn,
    filter: LogFilter,
    ack_timeout: Duration,
    max_in_flight: usize,
}

impl std::fmt::Debug for JetStreamRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamRelay")
            .field("name", &self.name)
            .field("filter", &self.filter)
            .field("ack_timeout", &self.ack_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// Builds a [`JetStreamRelay`].
#[must_use = "a builder does nothing until it is built"]
pub struct JetStreamRelayBuilder {
    name: String,
    context: Context,
    prefix: String,
    subject: Option<SubjectFn>,
    filter: LogFilter,
    ack_timeout: Duration,
    max_in_flight: usize,
}

impl std::fmt::Debug for JetStreamRelayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamRelayBuilder")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("custom_subject", &self.subject.is_some())
            .field("filter", &self.filter)
            .field("ack_timeout", &self.ack_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl JetStreamRelay {
    /// A builder for a relay named `name` (its checkpoint's name) publishing
    /// through `context`.
    pub fn builder(context: Context, name: impl Into<String>) -> JetStreamRelayBuilder {
        JetStreamRelayBuilder {
            name: name.into(),
            context,
            prefix: "outflow".to_owned(),
            subject: None,
            filter: LogFilter::all(),
            ack_timeout: Duration::from_secs(5),
            max_in_flight: 1000,
        }
    }

    /// The subject `event` is published on.
    pub fn subject_for(&self, event: &RecordedEvent) -> String {
        (self.subject)(event)
    }

    /// The headers `event` is published with (see [`headers`]).
    ///
    /// # Errors
    ///
    /// [`RelayError::InvalidHeader`] for a value with a line break;
    /// [`RelayError::Encode`] when the metadata does not serialize.
    pub fn headers_for(event: &RecordedEvent) -> Result<HeaderMap, RelayError> {
        let mut map = HeaderMap::new();
        let mut put = |name: &'static str, value: &str| {
            let value = HeaderValue::from_str(value).map_err(|_| RelayError::InvalidHeader {
                header: name,
                event: Box::new(event.event_ref()),
            })?;
            map.insert(name, value);
            Ok::<_, RelayError>(())
        };
        put(headers::MSG_ID, &event.event_id.to_string())?;
        put(headers::EVENT_TYPE, &event.event_type)?;
        put(headers::EVENT_VERSION, &event.event_version)?;
        put(headers::AGGREGATE_TYPE, &event.aggregate_type)?;
        put(headers::AGGREGATE_ID, &event.aggregate_id)?;
        put(headers::SEQUENCE, &event.sequence.to_string())?;
        put(headers::POSITION, &event.position.to_string())?;
        put(headers::TRANSACTION_ID, &event.transaction_id.to_string())?;
        put(
            headers::RECORDED_AT,
            &event
                .recorded_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        )?;
        if let Some(id) = event.correlation_id {
            put(headers::CORRELATION_ID, &id.to_string())?;
        }
        if let Some(id) = event.causation_id {
            put(headers::CAUSATION_ID, &id.to_string())?;
        }
        // The W3C trace context under its standard names too, so any
        // subscriber's tracing continues the event's trace.
        for name in [crate::trace::TRACEPARENT, crate::trace::TRACESTATE] {
            if let Some(value) = event.metadata.get(name) {
                put(name, value)?;
            }
        }
        if !event.metadata.is_empty() {
            // Sorted, so equal metadata gives equal headers.
            let sorted: std::collections::BTreeMap<_, _> = event.metadata.iter().collect();
            let json = serde_json::to_string(&sorted).map_err(|source| RelayError::Encode {
                what: "metadata",
                event: Box::new(event.event_ref()),
                source,
            })?;
            put(headers::METADATA, &json)?;
        }
        Ok(map)
    }
}

impl JetStreamRelayBuilder {
    /// The first token(s) of the default subject
    /// `<prefix>.<aggregate_type>.<event_type>` (default `outflow`). Ignored
    /// when [`subject`](Self::subject) sets a mapping.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Any mapping from event to subject, instead of the default. Use
    /// [`subject_token`] on names that may contain `.`, spaces or wildcards.
    pub fn subject<F>(mut self, subject: F) -> Self
    where
        F: Fn(&RecordedEvent) -> String + Send + Sync + 'static,
    {
        self.subject = Some(Arc::new(subject));
        self
    }

    /// The events to relay (default: all). Applied by the store.
    pub fn filter(mut self, filter: LogFilter) -> Self {
        self.filter = filter;
        self
    }

    /// How long to wait for each acknowledgement (default 5 s); also bounds
    /// the send of each message. A batch whose acknowledgements do not all
    /// arrive in time is published again.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// The most messages awaiting acknowledgement at once (default 1000); a
    /// larger batch is published in chunks of this size. Keep it at most the
    /// context's `max_ack_inflight` (5000 by default).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// The relay.
    ///
    /// # Errors
    ///
    /// [`RelayError::Config`] for an empty name, a zero timeout or a prefix
    /// that is not a valid subject.
    pub fn build(self) -> Result<JetStreamRelay, RelayError> {
        if self.name.is_empty() {
            return Err(RelayError::Config("the relay's name is empty".into()));
        }
        if self.ack_timeout.is_zero() {
            return Err(RelayError::Config(
                "the acknowledgement timeout is zero".into(),
            ));
        }
        let subject = match self.subject {
            Some(subject) => subject,
            None => {
                validate_subject(&self.prefix).map_err(|reason| {
                    RelayError::Config(format!("subject prefix `{}`: {reason}", self.prefix))
                })?;
                let prefix = self.prefix;
                Arc::new(move |event: &RecordedEvent| {
                    format!(
                        "{prefix}.{}.{}",
                        subject_token(&event.aggregate_type),
                        subject_token(&event.event_type)
                    )
                })
            }
        };
        let mut context = self.context;
        context.set_timeout(self.ack_timeout);
        Ok(JetStreamRelay {
            name: self.name,
            context,
            subject,
            filter: self.filter,
            ack_timeout: self.ack_timeout,
            max_in_flight: self.max_in_flight,
        })
    }
}

/// One message ready to publish.
struct Prepared<'a> {
    event: &'a RecordedEvent,
    subject: String,
    headers: HeaderMap,
    payload: Vec<u8>,
}

impl JetStreamRelay {
    fn prepare<'a>(&self, event: &'a RecordedEvent) -> Result<Prepared<'a>, RelayError> {
        let subject = self.subject_for(event);
        validate_subject(&subject).map_err(|reason| RelayError::InvalidSubject {
            subject: subject.clone(),
            event: Box::new(event.event_ref()),
            reason,
        })?;
        let payload = serde_json::to_vec(&event.payload).map_err(|source| RelayError::Encode {
            what: "payload",
            event: Box::new(event.event_ref()),
            source,
        })?;
        Ok(Prepared {
            event,
            subject,
            headers: Self::headers_for(event)?,
            payload,
        })
    }

    /// Publishes one chunk pipelined; `Ok` with the number of duplicates
    /// JetStream reported once every message is acknowledged.
    async fn publish_chunk(&self, chunk: &[Prepared<'_>]) -> Result<usize, HandlerError> {
        let mut pending = Vec::with_capacity(chunk.len());
        for message in chunk {
            let send = self.context.publish_with_headers(
                message.subject.clone(),
                message.headers.clone(),
                message.payload.clone().into(),
            );
            let ack = match tokio::time::timeout(self.ack_timeout, send).await {
                Ok(Ok(ack)) => ack,
                Ok(Err(error)) if error.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(HandlerError::from(RelayError::TooLarge {
                        event: Box::new(message.event.event_ref()),
                        bytes: message.payload.len(),
                        source: error,
                    }));
                }
                Ok(Err(error)) => {
                    return Err(HandlerError::transient(RelayError::Publish {
                        failed: chunk.len() - pending.len(),
                        total: chunk.len(),
                        event: Box::new(message.event.event_ref()),
                        subject: message.subject.clone(),
                        source: error,
                    }));
                }
                Err(_elapsed) => {
                    return Err(HandlerError::transient(RelayError::SendTimeout {
                        event: Box::new(message.event.event_ref()),
                        subject: message.subject.clone(),
                        timeout: self.ack_timeout,
                    }));
                }
            };
            pending.push(ack.into_future());
        }
        let results = futures::future::join_all(pending).await;
        let mut duplicates = 0;
        let mut failed = 0;
        let mut first = None;
        for (message, result) in chunk.iter().zip(results) {
            match result {
                Ok(ack) => duplicates += usize::from(ack.duplicate),
                Err(error) => {
                    failed += 1;
                    first.get_or_insert((message, error));
                }
            }
        }
        match first {
            None => Ok(duplicates),
            Some((message, source)) => Err(HandlerError::transient(RelayError::Publish {
                failed,
                total: chunk.len(),
                event: Box::new(message.event.event_ref()),
                subject: message.subject.clone(),
                source,
            })),
        }
    }
}

#[async_trait]
impl<S: Transactional> Projection<S> for JetStreamRelay {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        self.filter.clone()
    }

    /// Publishes the batch and awaits every acknowledgement before the
    /// checkpoint's transaction begins: no transaction is open while
    /// JetStream is slow or away.
    async fn effects(&self, events: &[RecordedEvent]) -> Result<(), HandlerError> {
        let prepared = events
            .iter()
            .map(|event| self.prepare(event))
            .collect::<Result<Vec<_>, _>>()?;
        let mut duplicates = 0;
        for chunk in prepared.chunks(self.max_in_flight) {
            match self.publish_chunk(chunk).await {
                Ok(d) => duplicates += d,
                Err(error) => {
                    tracing::warn!(relay = %self.name, "publishing to JetStream: {}", error.chain());
                    return Err(error);
                }
            }
        }
        if duplicates > 0 {
            tracing::debug!(
                relay = %self.name,
                duplicates,
                "JetStream already had some messages (an earlier attempt landed)"
            );
        }
        metrics::counter!("outflow_relay_published_total", "relay" => self.name.clone())
            .increment(events.len() as u64);
        Ok(())
    }

    async fn handle(
        &self,
        _events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        // Everything happened in `effects`; the transaction only moves the
        // checkpoint.
        Ok(())
    }
}
