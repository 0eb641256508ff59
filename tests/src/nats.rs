//! NATS helpers shared by the relay tests.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::Context;
use futures::StreamExt;
use outflow::relay::headers;

/// A JetStream context on `url`, reconnecting quickly.
pub async fn jetstream(url: &str) -> Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(300)))
        .connect(url)
        .await
        .expect("connect to nats-server");
    async_nats::jetstream::new(client)
}

/// Every message of the stream, read with an ephemeral consumer.
pub async fn read_stream(js: &Context, stream: &str) -> Vec<async_nats::jetstream::Message> {
    let mut handle = js.get_stream(stream).await.expect("stream");
    let expected = handle.info().await.expect("stream info").state.messages as usize;
    let consumer: PullConsumer = handle
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("ephemeral consumer");
    let mut messages = Vec::with_capacity(expected);
    let deadline = Instant::now() + Duration::from_secs(30);
    while messages.len() < expected {
        assert!(
            Instant::now() < deadline,
            "read {} of {expected} messages back within 30 s",
            messages.len()
        );
        let mut batch = consumer
            .batch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("pull");
        while let Some(message) = batch.next().await {
            messages.push(message.expect("message"));
        }
    }
    messages
}

/// The `Nats-Msg-Id` header of `message` (the test fails without one).
pub fn msg_id(message: &async_nats::Message) -> String {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get_last(headers::MSG_ID))
        .map(|v| v.as_str().to_owned())
        .expect("every message has a Nats-Msg-Id")
}
