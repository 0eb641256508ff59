//! Fixtures for the outbox suites: a recording sink (optionally failing at
//! random), a relay started and stopped or crashed, and waits on what the
//! sink saw. Generic over the outbox's store.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outflow::outbox::{
    Outbox, OutboxMessage, OutboxMessageRecord, OutboxRelay, OutboxSink, OutboxStore,
};
use outflow::projection::{HandlerError, RetryPolicy};
use outflow::StoreError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a sink saw: which relay delivered which message, in delivery order.
pub type Log = Arc<Mutex<Vec<(String, OutboxMessageRecord)>>>;

/// A sink recording every message it is handed; with `fail_rate > 0`, a
/// call fails at random after delivering a random prefix of its batch.
#[derive(Clone)]
pub struct Recorder {
    node: String,
    log: Log,
    fail_rate: f64,
    rng: Arc<Mutex<StdRng>>,
    /// How many calls failed.
    pub failures: Arc<Mutex<u64>>,
}

impl Recorder {
    /// A healthy sink recording into `log` under the name `node`.
    pub fn new(node: &str, log: &Log) -> Self {
        Recorder {
            node: node.to_owned(),
            log: log.clone(),
            fail_rate: 0.0,
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(7))),
            failures: Arc::new(Mutex::new(0)),
        }
    }

    /// Fails a call with probability `rate`, after a random prefix.
    pub fn failing(mut self, rate: f64) -> Self {
        self.fail_rate = rate;
        self
    }
}

#[async_trait::async_trait]
impl OutboxSink for Recorder {
    async fn deliver(&self, messages: &[OutboxMessageRecord]) -> Result<(), HandlerError> {
        let failure = {
            let mut rng = self.rng.lock().expect("rng");
            (rng.random::<f64>() < self.fail_rate).then(|| rng.random_range(0..messages.len()))
        };
        let delivered = failure.unwrap_or(messages.len());
        {
            let mut log = self.log.lock().expect("log");
            for message in &messages[..delivered] {
                log.push((self.node.clone(), message.clone()));
            }
        }
        match failure {
            Some(_) => {
                *self.failures.lock().expect("failures") += 1;
                Err(HandlerError::msg("the broker is unavailable (injected)"))
            }
            None => Ok(()),
        }
    }
}

/// A relay running in a task of its own.
pub struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), StoreError>>,
}

impl Running {
    /// Runs `relay` in a task of its own.
    pub fn start<S: OutboxStore>(relay: OutboxRelay<S>) -> Running {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { relay.run(shutdown).await }
        });
        Running { shutdown, task }
    }

    /// A graceful stop: the relay finishes its batch and gives the lease back.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("relay task")
            .expect("relay stopped cleanly");
    }

    /// A crash: the relay's future is dropped mid-flight, its lease is not
    /// given back and runs out.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A relay with short timings and small batches.
pub fn relay<S: OutboxStore>(
    outbox: &Outbox<S>,
    node: &str,
    sink: impl OutboxSink,
) -> OutboxRelay<S> {
    outbox
        .relay(sink)
        .node_id(node)
        .batch_size(17)
        .lease_ttl(Duration::from_secs(2))
        .heartbeat_interval(Duration::from_millis(200))
        .poll_interval(Duration::from_millis(100))
        .retry(fast_retry())
        .build()
        .expect("relay")
}

/// A backoff of a few milliseconds, so failures retry at once.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(20),
    }
}

/// The ids the sink saw, in order (redeliveries included).
pub fn delivered_ids(log: &Log) -> Vec<Uuid> {
    log.lock()
        .expect("log")
        .iter()
        .map(|(_, m)| m.message_id)
        .collect()
}

/// Waits until every message of `ids` has been delivered at least once.
pub async fn until_delivered(log: &Log, ids: &[Uuid]) {
    let wanted: HashSet<Uuid> = ids.iter().copied().collect();
    crate::eventually(
        &format!("delivery of {} messages", wanted.len()),
        Duration::from_secs(60),
        || {
            let seen: HashSet<Uuid> = delivered_ids(log).into_iter().collect();
            let missing = wanted.difference(&seen).count();
            async move {
                match missing {
                    0 => Ok(()),
                    n => Err(format!("{n} not delivered yet")),
                }
            }
        },
    )
    .await;
}

/// Message `n` of `key` on the topic `test.messages`.
pub fn message(key: &str, n: u64) -> OutboxMessage {
    OutboxMessage::new(key, "test.messages", json!({ "key": key, "n": n }))
}

/// Sends [`message`] `n` of `key` in a transaction of its own.
pub async fn send<S: OutboxStore>(outbox: &Outbox<S>, key: &str, n: u64) -> Uuid {
    outbox.send(message(key, n)).await.expect("send")
}
